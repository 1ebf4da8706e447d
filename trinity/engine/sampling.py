"""Batched, KV-cached decoding over a Hugging Face causal LM (optionally a peft multi-adapter model).

Every request is expanded into ``num_samples`` rows; all rows (from every request, whatever
adapter they name) are decoded as one batch step by step with a KV cache that grows in place.
The prefill runs once per distinct (adapter, prompt), left-padded, and its cache is gathered out
to the rows that share it: GRPO's n samples of a prompt cost one prefill, not n. Rows that stop
are dropped from the batch (and the cache) so the remaining rows do not pay for them.

Semantics (Tinker's ``SamplingParams``):

- ``temperature == 0`` is greedy; ``top_k=-1`` / ``top_p=1`` are off.
- ``stop=None`` stops at the EOS token ids; any explicit ``stop`` *replaces* that default (so
  ``stop=[]`` disables EOS too). ``stop`` may be a string, a list of strings or a list of token ids.
  The token that completes a stop (token or string) is kept in the output, as Tinker does;
  ``stop_reason`` is ``"stop"``, or ``"length"`` when ``max_tokens`` ran out first.
- ``seed``: each row owns a ``torch.Generator`` seeded from (seed, sample index), and draws one
  uniform number per step by inverse CDF, so a seeded request gives the same tokens whatever else
  shares its batch (up to floating-point differences across batch shapes).
- ``logprobs`` are the model's own log-softmax (temperature 1, no top-k / top-p) of the sampled
  tokens: the same numbers a teacher-forced forward pass gives, which is what importance ratios
  against the trainer's logprobs need. (The sampling distribution differs when temperature != 1.)
- ``prompt_logprobs``: position 0 is ``None``; position i is log p(prompt[i] | prompt[:i]).
- ``topk_prompt_logprobs=k``: at each prompt position i >= 1 the k likeliest tokens after
  prompt[:i] and their logprobs (most likely first); position 0 is the SDK's empty row.

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
from transformers.cache_utils import Cache, DynamicLayer

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
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
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
            generator = torch.Generator().manual_seed(
                (base_seed * 1_000_003 + sample_index) % 2**63
            )
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
                    generator=generator,
                )
            )
    return rows


def _choose_tokens(logits_BV: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """Pick one token per row: greedy, or inverse-CDF sampling after temperature / top-k / top-p."""
    sampled = [i for i, row in enumerate(rows) if row.temperature > 0 and row.top_k != 1]
    if len(sampled) < len(rows):
        tokens_B = logits_BV.argmax(dim=-1)
        if not sampled:
            return tokens_B
    else:  # every row samples: skip the argmax over the vocabulary
        tokens_B = torch.empty(len(rows), dtype=torch.long, device=logits_BV.device)
    device = logits_BV.device
    index_S = torch.tensor(sampled, dtype=torch.long, device=device)
    temperature_S1 = torch.tensor([rows[i].temperature for i in sampled], device=device)[:, None]
    all_rows = len(sampled) == len(rows)
    logits_SV = (logits_BV if all_rows else logits_BV[index_S]) / temperature_S1
    # Generators live on the CPU: one draw per row keeps each row's stream independent of others.
    uniform_S = torch.cat([torch.rand(1, generator=rows[i].generator) for i in sampled]).to(device)
    filtered = [j for j, i in enumerate(sampled) if rows[i].top_k > 0 or rows[i].top_p < 1.0]
    if filtered:
        # Sort only the rows that filter; the cutoff keeps the tokens whose preceding mass < top_p.
        index_F = torch.tensor(filtered, dtype=torch.long, device=device)
        sorted_FV, _ = logits_SV[index_F].sort(dim=-1, descending=True)
        probs_FV = sorted_FV.softmax(dim=-1)
        mass_before_FV = probs_FV.cumsum(dim=-1) - probs_FV
        top_p_F = torch.tensor([rows[sampled[j]].top_p for j in filtered], device=device)[:, None]
        keep_FV = mass_before_FV < top_p_F
        top_k_F = torch.tensor([rows[sampled[j]].top_k for j in filtered], device=device)[:, None]
        ranks_V = torch.arange(sorted_FV.shape[-1], device=device)[None, :]
        keep_FV &= (top_k_F <= 0) | (ranks_V < top_k_F)
        keep_FV[:, 0] = True
        kept_count_F = keep_FV.sum(dim=-1, keepdim=True)
        threshold_F = sorted_FV.gather(1, kept_count_F - 1)
        # Ties at the threshold are kept (a few extra tokens at most): no second sort needed.
        sub_FV = logits_SV[index_F]
        logits_SV[index_F] = sub_FV.masked_fill(sub_FV < threshold_F, float("-inf"))
    probs_SV = logits_SV.float().softmax(dim=-1)
    cdf_SV = probs_SV.cumsum(dim=-1)
    target_S = uniform_S * cdf_SV[:, -1]
    choice_S = torch.searchsorted(cdf_SV, target_S.unsqueeze(1), right=True).squeeze(1)
    # u < 1 so target < cdf[-1]: right-searchsorted lands on a token with nonzero probability.
    choice_S = choice_S.clamp(max=probs_SV.shape[-1] - 1)
    tokens_B[index_S] = choice_S
    return tokens_B


def _hit_stop_string(row: _Row, tokenizer, tail_tokens: int) -> bool:
    text = tokenizer.decode(row.tokens[-tail_tokens:], skip_special_tokens=False)
    return any(s in text for s in row.stop_strings)


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
) -> list[types.SampleResponse]:
    """Decode all requests as one batch; one ``SampleResponse`` per request, in order.

    ``tokenizer`` is needed only for string stops. ``max_context_length`` defaults to the model
    config's ``max_position_embeddings``; ``max_tokens=None`` means "up to the context length".
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

    was_training = model.training
    model.eval()
    try:
        prompt_logprobs, topk_prompt = _decode(
            model,
            requests,
            rows,
            adapters,
            pad_token_id,
            torch.device(device),
            tokenizer,
            tail_tokens,
        )
    finally:
        model.train(was_training)

    responses = []
    for index in range(len(requests)):
        sequences = [
            types.SampledSequence(
                stop_reason=row.stop_reason,
                sequence_id=f"{index}:{j}",
                tokens_np=np.asarray(row.tokens, dtype=np.int64),
                logprobs_np=np.asarray(row.logprobs, dtype=np.float32),
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


def _decode(model, requests, rows, adapters, pad_token_id, device, tokenizer, tail_tokens):
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
        request.prompt_logprobs or request.topk_prompt_logprobs for request in requests
    )

    cache = Cache(layer_class_to_replicate=_GrowingLayer)
    logits = _forward(
        model,
        input_ids_UT.to(device),
        mask_UT.to(device),
        position_UT.to(device),
        cache,
        None if adapters is None else [adapters[i] for i in first_U],
        0 if want_prompt_logprobs else 1,
    )
    prompt_logprobs: dict[int, list[float | None]] = {}
    topk_prompt: dict[int, TopkLogprobs] = {}
    if want_prompt_logprobs:
        done: set[int] = set()
        for i, row in enumerate(rows):
            request = requests[row.request_index]
            if row.request_index in done:
                continue
            done.add(row.request_index)
            n = len(row.prompt)
            logprobs_TV = logits[source_B[i], width - n : width - 1].float().log_softmax(dim=-1)
            if request.prompt_logprobs:
                targets_T = torch.tensor(row.prompt[1:], device=logprobs_TV.device)
                scored = logprobs_TV.gather(1, targets_T.unsqueeze(1)).squeeze(1).tolist()
                prompt_logprobs[row.request_index] = [None, *scored]
            if request.topk_prompt_logprobs:
                topk_prompt[row.request_index] = _topk(logprobs_TV, request.topk_prompt_logprobs)
    source_B = source_B.to(device)
    logits_BV = logits[:, -1][source_B]
    if len(unique) < batch:
        cache.batch_select_indices(source_B)
    mask_BT = mask_UT.to(device)[source_B]
    next_position_B = torch.tensor([len(row.prompt) for row in rows], device=device)

    active = list(range(batch))  # indices into rows of the rows still decoding
    while True:
        active_rows = [rows[i] for i in active]
        logits_BV = logits_BV.float()
        tokens_B = _choose_tokens(logits_BV, active_rows)
        logprobs_B = logits_BV.log_softmax(dim=-1).gather(1, tokens_B.unsqueeze(1)).squeeze(1)
        keep = []
        for j, (row, token, logprob) in enumerate(
            zip(active_rows, tokens_B.tolist(), logprobs_B.tolist(), strict=True)
        ):
            row.tokens.append(token)
            row.logprobs.append(logprob)
            if token in row.stop_ids or (
                row.stop_strings and _hit_stop_string(row, tokenizer, tail_tokens)
            ):
                row.stop_reason = "stop"
            elif len(row.tokens) < row.max_tokens:
                keep.append(j)
        if not keep:
            return prompt_logprobs, topk_prompt
        if len(keep) < len(active):
            keep_K = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(keep_K)
            mask_BT = mask_BT[keep_K]
            next_position_B = next_position_B[keep_K]
            tokens_B = tokens_B[keep_K]
            active = [active[j] for j in keep]
            if adapters is not None:
                adapters = [adapters[j] for j in keep]
        mask_BT = torch.cat([mask_BT, mask_BT.new_ones((len(active), 1))], dim=1)
        logits_BV = _forward(
            model,
            tokens_B.unsqueeze(1).to(device),
            mask_BT,
            next_position_B.unsqueeze(1),
            cache,
            adapters,
            1,
        )[:, -1]
        next_position_B = next_position_B + 1
