"""Batched, KV-cached decoding over a Hugging Face causal LM (optionally a peft multi-adapter model).

Every request is expanded into ``num_samples`` rows; all rows (from every request, whatever
adapter they name) are decoded as one batch step by step. The prefill runs once per distinct
(adapter, prompt), left-padded, and its cache is gathered out to the rows that share it: GRPO's
n samples of a prompt cost one prefill, not n. The prefill is the model's own forward, or, on the
fast path when no request wants prompt logprobs (only the last column's logits are needed),
``fast_decode.prefill`` on the fused decode layout (1.5x faster on a short prompt). The steps then
run through trinity/engine/fast_decode.py (a fused step on a preallocated static cache) where the
model is supported, else through the model's forward on a cache that grows in place (the
reference path, ``fast=False``). Stopped rows are compacted out of the batch once the live ones
fit in 3/4 of it. Choosing tokens is batched: per-row parameters are tensors, no Python per row.

Semantics (Tinker's ``SamplingParams``):

- ``temperature == 0`` is greedy; ``top_k=-1`` / ``top_p=1`` are off.
- ``stop=None`` stops at the EOS token ids; any explicit ``stop`` *replaces* that default (so
  ``stop=[]`` disables EOS too). ``stop`` may be a string, a list of strings or a list of token ids.
  The token that completes a stop (token or string) is kept in the output, as Tinker does;
  ``stop_reason`` is ``"stop"``, or ``"length"`` when ``max_tokens`` ran out first.
- ``seed``: each row draws one uniform number per step by inverse CDF, a counter-based hash
  (splitmix64) of (seed, sample index, step), so a seeded request gives the same tokens whatever
  else shares its batch (up to floating-point differences across batch shapes) and on both paths.
- ``logprobs`` are the model's own log-softmax (temperature 1, no top-k / top-p) of the sampled
  tokens: the same numbers a teacher-forced forward pass gives, which is what importance ratios
  against the trainer's logprobs need. (The sampling distribution differs when temperature != 1.)
- ``prompt_logprobs``: position 0 is ``None``; position i is log p(prompt[i] | prompt[:i]).
- ``topk_prompt_logprobs=k``: at each prompt position i >= 1 the k likeliest tokens after
  prompt[:i] and their logprobs (most likely first); position 0 is the SDK's empty row.
- ``topk_sample_logprobs=k``: at each sampled position the k likeliest tokens of the same
  distribution as ``logprobs`` (the model's log-softmax, temperature 1, no top-k / top-p), most
  likely first. Only the rows that ask pay for the ``topk`` (a batch without them runs as before).
- ``prompt_alt_tokens_k=k``: at each prompt position i >= 1, k independent draws (with
  replacement) from softmax(logits / temperature) after prompt[:i] (``temperature == 0``: the
  argmax k times; top-k / top-p do not apply), with their model logprobs (temperature 1, as
  ``logprobs``). Seeded by ``seed`` when given.

Simplification: when any row asks for prompt logprobs, the prefill keeps logits for every prompt
position of every distinct prompt (memory ~ prompts x prompt length x vocab x 4 bytes).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
from tinker import types
from tinker.types.topk_logprobs import MASK_LOGPROB, TopkLogprobs
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from trinity.engine import fast_decode, gemv

BASE_ADAPTER = "__base__"


class _GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends into spare room (doubling it when full) instead of
    ``torch.cat``: a decode step writes one position rather than copying the whole cache, which
    is a quarter of a batch-64 decode step at 100 tokens and grows with the length."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.used = 0
        self.key_room = self.value_room = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.used + key_states.shape[-2]
        if self.key_room is None or end > self.key_room.shape[-2]:
            capacity = max(end, 2 * self.used)
            self.key_room = _moved(self.key_room, key_states, capacity, self.used)
            self.value_room = _moved(self.value_room, value_states, capacity, self.used)
        self.key_room[..., self.used : end, :] = key_states
        self.value_room[..., self.used : end, :] = value_states
        self.used = end
        self.keys, self.values = self.key_room[..., :end, :], self.value_room[..., :end, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.used:
            self.key_room, self.value_room = self.key_room[indices], self.value_room[indices]
            self.keys = self.key_room[..., : self.used, :]
            self.values = self.value_room[..., : self.used, :]


def _moved(room: torch.Tensor | None, like: torch.Tensor, capacity: int, used: int) -> torch.Tensor:
    bigger = like.new_empty(*like.shape[:-2], capacity, like.shape[-1])
    if room is not None:
        bigger[..., :used, :] = room[..., :used, :]
    return bigger


@dataclass
class SampleRequest:
    """One Tinker ``sample`` call: ``adapter`` None means the base model."""

    prompt_tokens: list[int]
    num_samples: int = 1
    params: types.SamplingParams = field(default_factory=types.SamplingParams)
    adapter: str | None = None
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    prompt_alt_tokens_k: int = 0


@dataclass
class _Row:
    request_index: int
    prompt: list[int]
    adapter: str
    temperature: float
    top_k: int
    top_p: float
    max_tokens: int
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    seed: int
    topk: int = 0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk_logprobs: TopkLogprobs | None = None
    stop_reason: str = "length"


def _stop_spec(stop, eos_token_ids: list[int]) -> tuple[frozenset[int], tuple[str, ...]]:
    if stop is None:
        return frozenset(eos_token_ids), ()
    if isinstance(stop, str):
        return frozenset(), (stop,)
    ids = [s for s in stop if isinstance(s, int)]
    strings = [s for s in stop if isinstance(s, str)]
    return frozenset(ids), tuple(s for s in strings if s)


def _make_rows(
    requests: list[SampleRequest], eos_token_ids: list[int], max_context_length: int
) -> list[_Row]:
    rows = []
    for index, request in enumerate(requests):
        params = request.params
        if not request.prompt_tokens:
            raise ValueError("sample: prompt_tokens is empty")
        room = max_context_length - len(request.prompt_tokens)
        if room < 1:
            raise ValueError(
                f"sample: prompt of {len(request.prompt_tokens)} tokens leaves no room in the "
                f"context of {max_context_length}"
            )
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        stop_ids, stop_strings = _stop_spec(params.stop, eos_token_ids)
        base_seed = params.seed if params.seed is not None else random.getrandbits(40)
        for sample_index in range(request.num_samples):
            rows.append(
                _Row(
                    request_index=index,
                    prompt=list(request.prompt_tokens),
                    adapter=request.adapter or BASE_ADAPTER,
                    temperature=float(params.temperature),
                    top_k=int(params.top_k) if params.top_k is not None else -1,
                    top_p=float(params.top_p) if params.top_p is not None else 1.0,
                    max_tokens=max_tokens,
                    stop_ids=stop_ids,
                    stop_strings=stop_strings,
                    seed=(base_seed * 1_000_003 + sample_index) % 2**63,
                    topk=request.topk_sample_logprobs,
                )
            )
    return rows


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 that has its bits."""
    return value - 2**64 if value >= 2**63 else value


_GOLDEN, _MIX1, _MIX2 = (
    _signed(0x9E3779B97F4A7C15),
    _signed(0xBF58476D1CE4E5B9),
    _signed(0x94D049BB133111EB),
)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _uniform(seed_B: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform draw in [0, 1) per row from (row seed, step): splitmix64 on int64 tensors
    (multiplication wraps mod 2^64), so a row's stream depends on nothing else in its batch and
    needs no per-row generator."""
    z = seed_B + torch.full_like(seed_B, step + 1) * _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 11).double() * 2.0**-53


class _Sampler:
    """Per-row sampling parameters as tensors on the device, chosen from in one batched pass:
    greedy rows take the argmax, the others inverse-CDF sampling after temperature / top-k /
    top-p (only rows that filter are sorted). ``select`` follows row compaction."""

    def __init__(self, rows: list[_Row], device: torch.device):
        self.sampled = [row.temperature > 0 and row.top_k != 1 for row in rows]
        self.filters = [
            sampled and (row.top_k > 0 or row.top_p < 1.0)
            for row, sampled in zip(rows, self.sampled, strict=True)
        ]
        self.device = device
        self.temperature_B = torch.tensor(
            [row.temperature if s else 1.0 for row, s in zip(rows, self.sampled, strict=True)],
            device=device,
        )
        self.top_k_B = torch.tensor([row.top_k for row in rows], device=device)
        self.top_p_B = torch.tensor([row.top_p for row in rows], device=device)
        self.seed_B = torch.tensor([row.seed for row in rows], dtype=torch.long, device=device)
        width = max((len(row.stop_ids) for row in rows), default=0)
        stop_BS = torch.full((len(rows), max(width, 1)), -1, dtype=torch.long)
        for i, row in enumerate(rows):
            stop_BS[i, : len(row.stop_ids)] = torch.tensor(sorted(row.stop_ids), dtype=torch.long)
        self.stop_BS = stop_BS.to(device)
        self.max_tokens_B = torch.tensor([row.max_tokens for row in rows], device=device)
        self._index()

    def _index(self) -> None:
        device = self.device
        self.sampled_S = torch.tensor(
            [i for i, s in enumerate(self.sampled) if s], dtype=torch.long, device=device
        )
        self.filter_F = torch.tensor(
            [i for i, f in enumerate(self.filters) if f], dtype=torch.long, device=device
        )
        # The native kernel's per-row temperature: 0 for greedy rows.
        self.temperature_or_0_B = self.temperature_B * torch.tensor(self.sampled, device=device)

    def select(self, keep: list[int], keep_K: torch.Tensor) -> None:
        self.sampled = [self.sampled[i] for i in keep]
        self.filters = [self.filters[i] for i in keep]
        for name in ("temperature_B", "top_k_B", "top_p_B", "seed_B", "stop_BS", "max_tokens_B"):
            setattr(self, name, getattr(self, name)[keep_K])
        self._index()

    def choose_native(self, logits_BV: torch.Tensor, step: int) -> tuple | None:
        """(tokens, their logprobs) in one native call (kernels.cpp ``sample``: three passes over
        each row instead of the eight of ``choose`` and a log_softmax; the same draws, up to
        rounding at a token boundary), where the build loads and no row filters (top-k /
        top-p); else None."""
        if len(self.filter_F) or logits_BV.device.type != "cpu" or not fast_decode.FUSED:
            return None
        if (kernels := gemv.kernels()) is None:
            return None
        uniform_B = _uniform(self.seed_B, step).clamp(max=1 - 2.0**-22)
        return kernels.sample(logits_BV.contiguous(), self.temperature_or_0_B, uniform_B)

    def choose(self, logits_BV: torch.Tensor, step: int) -> torch.Tensor:
        """One token per row; ``logits_BV`` fp32."""
        n_sampled = len(self.sampled_S)
        if n_sampled == 0:
            return logits_BV.argmax(dim=-1)
        every = n_sampled == len(self.sampled)
        scaled_BV = logits_BV / self.temperature_B[:, None]
        if len(self.filter_F):
            index_F = self.filter_F
            sub_FV = scaled_BV[index_F]
            sorted_FV, _ = sub_FV.sort(dim=-1, descending=True)
            probs_FV = sorted_FV.softmax(dim=-1)
            # Keep the tokens whose preceding mass < top_p, and the top_k first (>= 1 always).
            keep_FV = (probs_FV.cumsum(dim=-1) - probs_FV) < self.top_p_B[index_F, None]
            top_k_F1 = self.top_k_B[index_F, None]
            ranks_V = torch.arange(sorted_FV.shape[-1], device=logits_BV.device)
            keep_FV &= (top_k_F1 <= 0) | (ranks_V < top_k_F1)
            keep_FV[:, 0] = True
            threshold_F1 = sorted_FV.gather(1, keep_FV.sum(dim=-1, keepdim=True) - 1)
            # Ties at the threshold are kept (a few extra tokens at most): no second sort.
            scaled_BV = scaled_BV.index_put(
                (index_F,), sub_FV.masked_fill(sub_FV < threshold_F1, float("-inf"))
            )
        chosen_SV = scaled_BV if every else scaled_BV[self.sampled_S]
        cdf_SV = chosen_SV.softmax(dim=-1).cumsum(dim=-1)
        uniform_S = _uniform(self.seed_B if every else self.seed_B[self.sampled_S], step)
        # u <= 1 - 2^-22 keeps u * cdf[-1] below cdf[-1] after fp32 rounding, so the
        # right-searchsorted lands on a token of nonzero probability.
        uniform_S = uniform_S.clamp(max=1 - 2.0**-22).to(cdf_SV.dtype)
        target_S1 = (uniform_S * cdf_SV[:, -1])[:, None]
        choice_S = torch.searchsorted(cdf_SV, target_S1, right=True).squeeze(1)
        if every:
            return choice_S
        return logits_BV.argmax(dim=-1).index_put((self.sampled_S,), choice_S)


def _forward(model, input_ids, attention_mask, position_ids, cache, adapters, logits_to_keep):
    kwargs = {}
    if adapters is not None:
        kwargs["adapter_names"] = adapters
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=logits_to_keep,
        **kwargs,
    ).logits


def _adapter_names(model, rows: list[_Row]) -> list[str] | None:
    """Per-row peft adapter names, or None when the model is not a peft model."""
    known = set(getattr(model, "peft_config", {}) or {})
    wanted = {row.adapter for row in rows} - {BASE_ADAPTER}
    if not known:
        if wanted:
            raise ValueError(f"sample: adapters {sorted(wanted)} requested on a model without any")
        return None
    missing = wanted - known
    if missing:
        raise ValueError(f"sample: unknown adapters {sorted(missing)}; known: {sorted(known)}")
    return [row.adapter for row in rows]


@torch.inference_mode()
def sample_batch(
    model,
    requests: list[SampleRequest],
    *,
    eos_token_ids: list[int],
    pad_token_id: int,
    device: torch.device | str = "cpu",
    tokenizer=None,
    max_context_length: int | None = None,
    fast: bool = True,
    compiled: bool = False,
) -> list[types.SampleResponse]:
    """Decode all requests as one batch; one ``SampleResponse`` per request, in order.

    ``tokenizer`` is needed only for string stops. ``max_context_length`` defaults to the model
    config's ``max_position_embeddings``; ``max_tokens=None`` means "up to the context length".
    ``fast``: decode steps through trinity/engine/fast_decode.py where the model is supported
    (else, or with ``fast=False``, the Hugging Face forward: the reference path);
    ``compiled``: that step under ``torch.compile`` (off by default: see docs/benchmarks.md,
    "Sampling speed", for what compilation costs against what it saves on a CPU).
    """
    if not requests:
        return []
    if max_context_length is None:
        max_context_length = int(getattr(model.config, "max_position_embeddings", 4096))
    rows = _make_rows(requests, list(eos_token_ids), max_context_length)
    if any(row.stop_strings for row in rows) and tokenizer is None:
        raise ValueError("sample: stop strings need a tokenizer")
    tail_tokens = 4 + max((len(s) for row in rows for s in row.stop_strings), default=0)
    adapters = _adapter_names(model, rows)

    # Only when needed: transformers' ``train`` / ``eval`` walk every module (its hub-kernel
    # hook), ~0.05 s each for the demo model, which was 5 % of a GRPO sampling call.
    was_training = model.training
    if was_training:
        model.eval()
    try:
        prompt_logprobs, topk_prompt, alt_tokens = _decode(
            model,
            requests,
            rows,
            adapters,
            pad_token_id,
            torch.device(device),
            tokenizer,
            tail_tokens,
            fast_decode.build(model) if fast else None,
            compiled,
        )
    finally:
        if was_training:
            model.train()

    responses = []
    for index in range(len(requests)):
        sequences = [
            types.SampledSequence(
                stop_reason=row.stop_reason,
                sequence_id=f"{index}:{j}",
                tokens_np=np.asarray(row.tokens, dtype=np.int64),
                logprobs_np=np.asarray(row.logprobs, dtype=np.float32),
                topk_logprobs_np=row.topk_logprobs,
            )
            for j, row in enumerate(r for r in rows if r.request_index == index)
        ]
        scored = prompt_logprobs.get(index)
        topk = topk_prompt.get(index)
        responses.append(
            types.SampleResponse(
                sequences=sequences,
                # NaN marks the unscored position 0; the SDK reads it back as None.
                prompt_logprobs_np=None
                if scored is None
                else np.asarray([np.nan, *scored[1:]], dtype=np.float32),
                topk_prompt_logprobs_np=topk,
                prompt_alt_tokens=alt_tokens.get(index),
            )
        )
    return responses


def _topk(logprobs_TV: torch.Tensor, k: int) -> TopkLogprobs:
    """Top-k rows for prompt positions 1..T, after the SDK's empty row for position 0."""
    values_TK, ids_TK = logprobs_TV.topk(min(k, logprobs_TV.shape[-1]), dim=-1)
    ids = np.zeros((len(ids_TK) + 1, k), dtype=np.int32)
    lps = np.full((len(ids_TK) + 1, k), MASK_LOGPROB, dtype=np.float32)
    ids[1:, : ids_TK.shape[1]] = ids_TK.cpu().numpy()
    lps[1:, : ids_TK.shape[1]] = values_TK.cpu().numpy()
    return TopkLogprobs(token_ids=ids, logprobs=lps)


def _alt_tokens(logits_TV: torch.Tensor, request: SampleRequest) -> types.PromptAltTokens:
    """``prompt_alt_tokens_k`` draws per prompt position 1..T (see the module docstring)."""
    k, params = request.prompt_alt_tokens_k, request.params
    logprobs_TV = logits_TV.log_softmax(dim=-1)
    if params.temperature > 0 and len(logits_TV):
        generator = torch.Generator(device=logits_TV.device)
        generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        probs_TV = (logits_TV / params.temperature).softmax(dim=-1)
        tokens_TK = torch.multinomial(probs_TV, k, replacement=True, generator=generator)
    else:
        tokens_TK = logits_TV.argmax(dim=-1, keepdim=True).expand(-1, k)
    logprobs_TK = logprobs_TV.gather(1, tokens_TK)
    return types.PromptAltTokens(
        tokens=types.TensorData.from_numpy(tokens_TK.cpu().numpy().astype(np.int64)),
        logprobs=types.TensorData.from_numpy(logprobs_TK.cpu().numpy().astype(np.float32)),
    )


def _decode(
    model, requests, rows, adapters, pad_token_id, device, tokenizer, tail_tokens, weights, compiled
):
    batch = len(rows)
    # Rows with the same prompt and adapter (a request's samples, GRPO's repeats) share one
    # prefill row; its cache and last logits are then gathered out to every such row.
    unique: dict[tuple, int] = {}  # (adapter, *prompt) -> prefill row
    first_U: list[int] = []  # the first row of each prefill row
    sources = []
    for i, row in enumerate(rows):
        key = (row.adapter, *row.prompt)
        if key not in unique:
            unique[key] = len(first_U)
            first_U.append(i)
        sources.append(unique[key])
    source_B = torch.tensor(sources)
    prompts_U = [rows[i].prompt for i in first_U]
    width = max(len(p) for p in prompts_U)
    input_ids_UT = torch.full((len(prompts_U), width), pad_token_id, dtype=torch.long)
    mask_UT = torch.zeros((len(prompts_U), width), dtype=torch.long)
    for u, prompt in enumerate(prompts_U):
        input_ids_UT[u, width - len(prompt) :] = torch.tensor(prompt)
        mask_UT[u, width - len(prompt) :] = 1
    position_UT = (mask_UT.cumsum(dim=1) - 1).clamp(min=0)
    want_prompt_logprobs = any(
        request.prompt_logprobs or request.topk_prompt_logprobs or request.prompt_alt_tokens_k
        for request in requests
    )

    adapters_U = None if adapters is None else [adapters[i] for i in first_U]
    # the adapters' terms of the prefill rows, once: the fast prefill's and, gathered by
    # ``source_B``, the decode steps'
    lora_U = None if weights is None else fast_decode.lora_inputs(weights, adapters_U, device)
    if weights is not None and not want_prompt_logprobs:
        # Only the last column's logits are needed: the prefill on the decode layout
        # (fast_decode.prefill): 43 ms against the Hugging Face forward's 64 for the demo
        # model's 41-token prompt (docs/benchmarks.md).
        logits_UV, layers = fast_decode.prefill(
            weights,
            input_ids_UT.to(device),
            mask_UT.to(device),
            position_UT.to(device),
            lora_U,
        )
        logits = logits_UV[:, None]
    else:
        cache = (
            DynamicCache() if weights is not None else Cache(layer_class_to_replicate=_GrowingLayer)
        )
        logits = _forward(
            model,
            input_ids_UT.to(device),
            mask_UT.to(device),
            position_UT.to(device),
            cache,
            adapters_U,
            # the last column as an index tensor, not ``1``: the slice ``[:, -1:]`` is a strided
            # view, on which the head's matmul expanded the unembedding per row into a bmm (a
            # 113 MB copy per prompt of the demo model, ~0.4 s of a 16-row GRPO rollout)
            0 if want_prompt_logprobs else torch.tensor([width - 1], device=device),
        )
        if weights is not None:
            layers = [(layer.keys, layer.values) for layer in cache.layers]
    prompt_logprobs: dict[int, list[float | None]] = {}
    topk_prompt: dict[int, TopkLogprobs] = {}
    alt_tokens: dict[int, types.PromptAltTokens] = {}
    if want_prompt_logprobs:
        done: set[int] = set()
        for i, row in enumerate(rows):
            request = requests[row.request_index]
            if row.request_index in done:
                continue
            done.add(row.request_index)
            n = len(row.prompt)
            logits_TV = logits[source_B[i], width - n : width - 1].float()
            logprobs_TV = logits_TV.log_softmax(dim=-1)
            if request.prompt_logprobs:
                targets_T = torch.tensor(row.prompt[1:], device=logprobs_TV.device)
                scored = logprobs_TV.gather(1, targets_T.unsqueeze(1)).squeeze(1).tolist()
                prompt_logprobs[row.request_index] = [None, *scored]
            if request.topk_prompt_logprobs:
                topk_prompt[row.request_index] = _topk(logprobs_TV, request.topk_prompt_logprobs)
            if request.prompt_alt_tokens_k:
                alt_tokens[row.request_index] = _alt_tokens(logits_TV, request)
    source_B = source_B.to(device)
    logits_BV = logits[:, -1][source_B].float()
    if weights is not None:
        mask_BW = mask_UT.to(device)[source_B]
        new_tokens = max(row.max_tokens for row in rows)
        stepper = _FastStepper(weights, layers, source_B, mask_BW, lora_U, new_tokens, compiled)
    else:
        if len(unique) < batch:
            cache.batch_select_indices(source_B)
        stepper = _HFStepper(model, cache, mask_UT.to(device)[source_B], adapters)
    _generate(stepper, logits_BV, rows, device, tokenizer, tail_tokens)
    return prompt_logprobs, topk_prompt, alt_tokens


class _HFStepper:
    """The reference decode step: the Hugging Face forward on a growing cache."""

    @staticmethod
    def bucket(going: int) -> int:
        return going

    def __init__(self, model, cache, mask_BT: torch.Tensor, adapters: list[str] | None):
        self.model, self.cache, self.mask_BT, self.adapters = model, cache, mask_BT, adapters

    def __call__(self, tokens_B: torch.Tensor, position_B: torch.Tensor) -> torch.Tensor:
        self.mask_BT = torch.cat([self.mask_BT, self.mask_BT.new_ones((len(tokens_B), 1))], 1)
        logits = _forward(
            self.model,
            tokens_B[:, None],
            self.mask_BT,
            position_B[:, None],
            self.cache,
            self.adapters,
            1,
        )
        return logits[:, -1].float()

    def select(self, keep: list[int], keep_K: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep_K)
        self.mask_BT = self.mask_BT[keep_K]
        if self.adapters is not None:
            self.adapters = [self.adapters[j] for j in keep]


class _FastStepper:
    """The fused decode step (trinity/engine/fast_decode.py) on a preallocated static cache
    that grows (doubling) only when a step would run past it.

    ``compiled``: the step runs under ``torch.compile`` with static shapes, so the cache
    capacity is a multiple of 256 columns, attention spans all of it (masked), and batches are
    compacted to powers of two only (``bucket``): a handful of shapes, each compiled once and
    then cached on disk.
    """

    room = 256  # columns allocated past the prompt at first, at most

    def __init__(self, weights, layers, source_B, mask_BW, lora_U, new_tokens: int, compiled):
        """``layers``: the prefill's (keys, values) per layer and ``lora_U`` its adapters' terms
        (``fast_decode.lora_inputs``), one row per prefill row; ``new_tokens``: the most any row
        may generate (the cache needs no column past that: a GRPO rollout's 64 tokens took
        a cache of 296 columns for 104 used, zeroed and copied at each compaction in full)."""
        self.weights = weights
        self.compiled = compiled
        self.step = fast_decode.compiled_decode_step() if compiled else fast_decode.decode_step
        layers = [(keys[source_B], values[source_B]) for keys, values in layers]
        width = mask_BW.shape[1]
        capacity = width + min(self.room, new_tokens)
        if compiled:
            capacity = -(-capacity // 256) * 256
        self.cache = fast_decode.StaticCache.from_layers(weights, layers, capacity)
        self.column = width
        # Set for the prompt's real tokens, then column by column as the steps write them.
        self.mask_BT = torch.zeros(
            (len(source_B), self.cache.capacity), dtype=torch.bool, device=mask_BW.device
        )
        self.mask_BT[:, :width] = mask_BW.bool()
        self.lora = fast_decode.lora_rows(lora_U, source_B)

    def bucket(self, going: int) -> int:
        """The batch size to compact ``going`` live rows into."""
        return 1 << (going - 1).bit_length() if self.compiled else going

    def __call__(self, tokens_B: torch.Tensor, position_B: torch.Tensor) -> torch.Tensor:
        if self.column >= self.cache.capacity:
            capacity = 2 * self.cache.capacity
            self.cache.grow(capacity)
            grown = self.mask_BT.new_zeros((len(tokens_B), capacity))
            grown[:, : self.mask_BT.shape[1]] = self.mask_BT
            self.mask_BT = grown
        self.mask_BT[:, self.column] = True
        logits_BV = self.step(
            self.weights,
            self.cache.keys,
            self.cache.values,
            tokens_B,
            position_B,
            self.mask_BT if self.compiled else self.mask_BT[:, : self.column + 1],
            torch.tensor([self.column], device=tokens_B.device),
            self.lora,
        )
        self.column += 1
        return logits_BV.float()

    def select(self, keep: list[int], keep_K: torch.Tensor) -> None:
        self.cache.select(keep_K)
        self.mask_BT = self.mask_BT[keep_K]
        self.lora = fast_decode.lora_rows(self.lora, keep_K)


def _generate(stepper, logits_BV, rows: list[_Row], device, tokenizer, tail_tokens) -> None:
    """Decode until every row stops; fills each row's tokens, logprobs and stop reason.

    Per step one host sync (how many rows are still going). Stopped rows stay in the batch
    (their tokens are ignored) until the live ones fit in at most 3/4 of it: then the batch is
    compacted (to ``stepper.bucket`` rows), so shapes change rarely and the cache is copied
    rarely.
    """
    batch = len(rows)
    sampler = _Sampler(rows, device)
    max_new = max(row.max_tokens for row in rows)
    tokens_RN = torch.zeros((batch, max_new), dtype=torch.long, device=device)
    logprobs_RN = torch.zeros((batch, max_new), dtype=torch.float32, device=device)
    length_R = torch.zeros(batch, dtype=torch.long, device=device)
    stopped_R = torch.zeros(batch, dtype=torch.bool, device=device)
    row_B = torch.arange(batch, device=device)  # the row (index into rows) of each batch slot
    position_B = torch.tensor([len(row.prompt) for row in rows], device=device)
    string_rows = [i for i, row in enumerate(rows) if row.stop_strings]
    live = list(range(batch))  # batch slots -> rows, host side
    # topk_sample_logprobs: only the rows that ask, at the widest k they ask for.
    k_max = max(row.topk for row in rows)
    topk_ids_RNK = torch.zeros((batch, max_new, k_max), dtype=torch.long, device=device)
    topk_lps_RNK = torch.zeros((batch, max_new, k_max), dtype=torch.float32, device=device)

    def topk_slots() -> torch.Tensor:
        wanted = [j for j, i in enumerate(live) if rows[i].topk]
        return torch.tensor(wanted, dtype=torch.long, device=device)

    slots_Q = topk_slots()
    step = 0
    while True:
        chosen = None if len(slots_Q) else sampler.choose_native(logits_BV, step)
        if chosen is None:
            tokens_B = sampler.choose(logits_BV, step)
            logprobs_BV = logits_BV.log_softmax(dim=-1)
            logprobs_B = logprobs_BV.gather(1, tokens_B[:, None]).squeeze(1)
        else:
            tokens_B, logprobs_B = chosen
        tokens_RN[row_B, step] = tokens_B
        logprobs_RN[row_B, step] = logprobs_B
        if len(slots_Q):
            values_QK, ids_QK = logprobs_BV[slots_Q].topk(k_max, dim=-1)
            topk_ids_RNK[row_B[slots_Q], step] = ids_QK
            topk_lps_RNK[row_B[slots_Q], step] = values_QK
        going_B = length_R[row_B] == 0
        hit_B = (tokens_B[:, None] == sampler.stop_BS).any(dim=1)
        if string_rows:
            hit_B = hit_B | _string_hits(tokens_RN, row_B, live, rows, step, tokenizer, tail_tokens)
        ends_B = going_B & (hit_B | (sampler.max_tokens_B <= step + 1))
        length_R[row_B] = torch.where(ends_B, step + 1, length_R[row_B])
        stopped_R[row_B] |= ends_B & hit_B
        going = int((going_B & ~ends_B).sum())
        if going == 0:
            break
        target = stepper.bucket(going)
        if target <= 3 * len(live) // 4:
            # The live rows, then (bucketed steps only) stopped ones as filler up to ``target``.
            order_B = (length_R[row_B] != 0).to(torch.int8).argsort(stable=True)
            keep = sorted(order_B[:target].tolist())
            keep_K = torch.tensor(keep, device=device)
            stepper.select(keep, keep_K)
            sampler.select(keep, keep_K)
            row_B, position_B, tokens_B = row_B[keep_K], position_B[keep_K], tokens_B[keep_K]
            live = [live[j] for j in keep]
            if k_max:
                slots_Q = topk_slots()
        logits_BV = stepper(tokens_B, position_B)
        position_B = position_B + 1
        step += 1
    lengths, stopped = length_R.tolist(), stopped_R.tolist()
    tokens_all, logprobs_all = tokens_RN.tolist(), logprobs_RN.tolist()
    for i, row in enumerate(rows):
        row.tokens = tokens_all[i][: lengths[i]]
        row.logprobs = logprobs_all[i][: lengths[i]]
        row.stop_reason = "stop" if stopped[i] else "length"
        if row.topk:
            ids_NK = topk_ids_RNK[i, : lengths[i], : row.topk].to(torch.int32).cpu().numpy()
            lps_NK = topk_lps_RNK[i, : lengths[i], : row.topk].cpu().numpy()
            row.topk_logprobs = TopkLogprobs(token_ids=ids_NK, logprobs=lps_NK)


def _string_hits(tokens_RN, row_B, live, rows, step, tokenizer, tail_tokens) -> torch.Tensor:
    """Which batch slots just completed one of their row's stop strings (host-side decode,
    only for rows that have stop strings)."""
    hits = [False] * len(live)
    for j, i in enumerate(live):
        row = rows[i]
        if row.stop_strings:
            tail = tokens_RN[i, max(0, step + 1 - tail_tokens) : step + 1].tolist()
            text = tokenizer.decode(tail, skip_special_tokens=False)
            hits[j] = any(s in text for s in row.stop_strings)
    return torch.tensor(hits, device=row_B.device)
