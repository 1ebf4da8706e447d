"""The fast decode step: a Llama-family decoder re-laid out for one-token steps.

Why: besides its matmuls (at a decode batch's few rows by trinity/engine/gemv.py's kernel), a
decode step is the Hugging Face forward's ~20 separately dispatched small ops per layer (and its
Python around them). Here a step is, per layer: rmsnorm, one fused QKV matmul, rotary on q and k
together (``x * cos + rotate_half(x) * sin``, the half swap one ``cat``: as a matmul by a
permutation it was a batched matmul per layer, 15x slower at batch 64), two in-place writes into a
preallocated KV cache, one ``scaled_dot_product_attention`` over the valid prefix (the query
heads of a KV group are the "sequence" of a plain SDPA call: no KV repetition), the output
matmul, rmsnorm, one fused gate-up matmul, SiLU-and-multiply, the down matmul.

LoRA: every adapter of the batch is concatenated along the rank (``A_cat``: [n r, in],
``B_cat``: [out, n r], scaling folded into B); a row's low-rank term is
``((x A_cat^T) * mask_row) B_cat^T`` with ``mask_row`` selecting its adapter's block (all zeros for
base rows): two extra matmuls per fused projection whatever the adapter mix, and exact, since the
other blocks contribute exact zeros.

On CPU, where the engine's native build loads (trinity/engine/gemv.py, kernels.cpp), the whole
step after the embedding is one C++ call (``kernels.decode_step``): the same ops in the same order
with the same roundings, but rmsnorm fused with the residual add before it, rotary fused with the
cache writes, a one-query GQA attention over each row's valid columns (one pass over its keys, one
over its values, fp32 softmax) instead of SDPA (whose CPU kernel costs per row and head, not per
FLOP), SiLU-and-multiply in one pass, and no Python between the ops. LoRA goes in as the same
masked low-rank terms: each A product in the parallel region of its base weight's matmul, each B
product by outer products (no per-output sums over the rank) over B's nonzero blocks only, added
to the rows the next op reads (rotary, the residual add, SiLU-and-multiply) in that op's own
parallel region (``LowTerm`` in kernels.cpp). Its matmuls are the engine's small-M kernel where
that beats at::linear (``small_mm``: up to 32 rows a thread; at batch 16 a step went from 45 to
30 ms). Without the build, or with ``TRINITY_FUSED_DECODE=0``, or under
``torch.compile``, the step is the torch ops above (matmuls of a few rows still by the kernel), and
sampling.py chooses tokens by torch ops too.

``torch.compile`` of the step (``compile=True``) traces the layer loop into one graph per
(batch, cache-capacity) shape; see ``DecodeStep`` and docs/benchmarks.md ("Sampling speed") for
what it costs and when the engine uses it.

Supported: ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` (optionally in
peft with plain LoRA adapters: no DoRA, not merged), SiLU MLP, no sliding window. Anything else
makes ``build`` return None and the caller uses the Hugging Face forward (the reference path).
"""

from __future__ import annotations

import mmap
import os
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from trinity.engine import gemv, pool
from trinity.engine.demo_model import cache_root

_SUPPORTED = {"llama", "mistral", "qwen2"}
_ABSENT = torch.empty(0)  # an absent bias or LoRA term in the native step's flat lists
# The native step and sampler where the build loads (sampling.py reads FUSED too). In bf16 the
# sampled logprobs of either step differ from the teacher-forced forward's by bf16 roundings
# alike (the demo model: mean 0.040 native, 0.041 torch ops; docs/benchmarks.md).
FUSED = os.environ.get("TRINITY_FUSED_DECODE", "1") != "0"


def _linear_parts(module: nn.Module) -> tuple[nn.Linear, dict]:
    """(base Linear, {adapter: (A [r, in], B [out, r] * scaling)}) of a plain or peft Linear."""
    base = getattr(module, "base_layer", module)
    loras = {}
    if hasattr(module, "lora_A"):
        for name in module.lora_A:
            b = module.lora_B[name].weight * module.scaling[name]
            loras[name] = (module.lora_A[name].weight, b)
    return base, loras


def _unsupported(model: nn.Module) -> str | None:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    if config.model_type not in _SUPPORTED:
        return f"model_type {config.model_type}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        if config.model_type != "qwen2" or getattr(config, "use_sliding_window", False):
            return "sliding window"
    for module in inner.modules():
        if hasattr(module, "lora_A"):
            if getattr(module, "merged", False) or getattr(module, "lora_magnitude_vector", None):
                return "merged or DoRA adapter"
    return None


@dataclass
class _Proj:
    """A (possibly fused) projection: ``weight_OI`` (+ bias) and the LoRA of every adapter."""

    weight_OI: torch.Tensor
    bias_O: torch.Tensor | None
    a_by: dict  # adapter -> A [r, in] (the fused parts' ranks concatenated)
    b_by: dict  # adapter -> B [out, r] (scaling folded), block-diagonal over the fused parts
    blocks_by: dict  # adapter -> B's blocks, (row, row end, rank column, column end) each


def _fuse(modules: list[nn.Module]) -> _Proj:
    bases = [getattr(m, "base_layer", m) for m in modules]
    weight = torch.cat([b.weight for b in bases]) if len(bases) > 1 else bases[0].weight
    bias = None
    if any(b.bias is not None for b in bases):
        bias = torch.cat(
            [b.bias if b.bias is not None else b.weight.new_zeros(b.out_features) for b in bases]
        )
    return _Proj(weight, bias, *_fused_loras(modules))


def _fused_loras(modules: list[nn.Module]) -> tuple[dict, dict, dict]:
    """(A, B, B's blocks) per adapter of the fused projection: the parts' ranks concatenated in
    A, B block-diagonal (scaling folded in)."""
    parts = [_linear_parts(m) for m in modules]
    out_rows = sum(base.out_features for base, _ in parts)
    a_by, b_by, blocks_by = {}, {}, {}
    for name in set().union(*(loras for _, loras in parts)):
        a_by[name] = torch.cat([loras[name][0] for _, loras in parts if name in loras])
        # Block-diagonal B: each fused part's output rows take only that part's rank columns.
        b_full = a_by[name].new_zeros(out_rows, a_by[name].shape[0])
        blocks_by[name] = []
        row = col = 0
        for base, loras in parts:
            if name in loras:
                a, b = loras[name]
                b_full[row : row + base.out_features, col : col + a.shape[0]] = b
                blocks_by[name].append((row, row + base.out_features, col, col + a.shape[0]))
                col += a.shape[0]
            row += base.out_features
        b_by[name] = b_full
    return a_by, b_by, blocks_by


class Weights:
    """The model's weights in decode layout (fused QKV / gate-up), cached per model and rebuilt
    when any source tensor changes (by ``data_ptr`` and version counter, so optimizer steps and
    loaded states are seen); when only LoRA factors changed, only their terms are."""

    def __init__(self, model: nn.Module):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = inner.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.layers_n = config.num_hidden_layers
        decoder = inner.model
        self.rotary = decoder.rotary_emb
        self.embed = decoder.embed_tokens.weight
        self.norm_w = decoder.norm.weight
        self.norm_eps = decoder.norm.variance_epsilon
        self.layers = []
        self.sources = []  # (projection, its modules), to refresh the adapters' terms alone
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            groups = [[attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj]]
            groups += [[mlp.gate_proj, mlp.up_proj], [mlp.down_proj]]
            qkv, out, gate_up, down = (self._fuse(group) for group in groups)
            norms = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            self.layers.append((norms[0], qkv, out, norms[1], gate_up, down))
        self.head = self._fuse([inner.get_output_embeddings()])
        projections = [p for layer in self.layers for p in layer[1:3] + layer[4:6]] + [self.head]
        for proj, copy in zip(
            projections, huge_page_copies([p.weight_OI for p in projections]), strict=True
        ):
            proj.weight_OI = copy
        self.signature, self.base_signature = _signatures(model)
        # The native step's weight list (kernels.cpp, decode_step), and the dtype all of it has
        # (None where mixed, or not fp32 / bf16: then the torch ops run).
        self.flat = [
            t
            for norm1, qkv, out, norm2, gate_up, down in self.layers
            for t in (norm1, *_pair(qkv), *_pair(out), norm2, *_pair(gate_up), *_pair(down))
        ] + [self.norm_w, *_pair(self.head)]
        dtypes = {t.dtype for t in self.flat if t is not _ABSENT} | {self.embed.dtype}
        self.flat_dtype = dtypes.pop() if len(dtypes) == 1 else None
        if self.flat_dtype not in (torch.float32, torch.bfloat16):
            self.flat_dtype = None

    def _fuse(self, modules: list[nn.Module]) -> _Proj:
        proj = _fuse(modules)
        self.sources.append((proj, modules))
        return proj

    def refresh_adapters(self, signature: tuple) -> None:
        """Only the adapters changed (an optimizer step on LoRA weights, a new snapshot): their
        terms again, the base weights' decode-layout copies kept (rebuilding those took ~0.4 s for
        the demo model, every GRPO step); ``signature``: the model's now."""
        for proj, modules in self.sources:
            proj.a_by, proj.b_by, proj.blocks_by = _fused_loras(modules)
        self.signature = signature


def huge_page_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``tensors`` side by side in one buffer on transparent huge pages (Linux, THP in
    ``madvise`` or ``always`` mode; elsewhere the tensors themselves).

    Why: a decode step streams every weight once, and on 4 KB pages the reads miss the TLB every
    4 KB; on 2 MB pages the batch-1 native step of the demo model took 10.4-10.9 ms instead of
    12.9-13.2 (docs/benchmarks.md). The cost: the decode layout is then a full copy of the matmul weights
    (the fused QKV / gate-up ones were copies already)."""
    if not hasattr(mmap, "MADV_HUGEPAGE") or not tensors:
        return tensors
    sizes = [-(-t.numel() * t.element_size() // 64) * 64 for t in tensors]  # 64-byte aligned
    buffer = mmap.mmap(-1, sum(sizes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(buffer, dtype=torch.uint8)  # keeps ``buffer`` alive
    copies, start = [], 0
    for tensor, size in zip(tensors, sizes, strict=True):
        nbytes = tensor.numel() * tensor.element_size()
        view = raw[start : start + nbytes].view(tensor.dtype).view(tensor.shape)
        copies.append(view.copy_(tensor.detach()))
        start += size
    return copies


def _pair(proj: _Proj) -> tuple[torch.Tensor, torch.Tensor]:
    return proj.weight_OI, _ABSENT if proj.bias_O is None else proj.bias_O


def _signatures(model: nn.Module) -> tuple[tuple, tuple]:
    """(every parameter's (data_ptr, version), the same without the LoRA factors), in one walk
    over the parameters (each walk of the demo model's peft wrapper took ~17 ms): a changed
    tensor changes them."""
    every, base = [], []
    for name, p in model.named_parameters():
        key = (p.data_ptr(), p._version)
        every.append(key)
        if "lora_" not in name:
            base.append(key)
    return tuple(every), tuple(base)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def build(model: nn.Module) -> Weights | None:
    """The decode-layout weights of ``model`` (cached), or None when it is not supported. An
    unchanged model is its cached layout without another look (merging an adapter or adding a
    DoRA one changes its parameters)."""
    cached = _CACHE.get(model)
    signature, base_signature = _signatures(model)
    if cached is not None and cached.signature == signature:
        return cached
    if _unsupported(model) is not None:
        return None
    if cached is not None and cached.base_signature == base_signature:
        with torch.inference_mode():
            cached.refresh_adapters(signature)
        return cached
    _CACHE.pop(model, None)  # free the stale copy before building the new one
    with torch.inference_mode():
        weights = Weights(model)
    _CACHE[model] = weights
    return weights


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm (fp32 statistics, weight applied in the input dtype)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _apply(proj: _Proj, x: torch.Tensor, lora: LoraTerm | None) -> torch.Tensor:
    out = gemv.linear(x, proj.weight_OI, proj.bias_O)
    if lora is not None:
        low_BN = gemv.linear(x, lora.a_NI, None)
        low_BN = low_BN if lora.mask_BN is None else low_BN * lora.mask_BN
        out = out + gemv.linear(low_BN, lora.b_ON, None).to(out.dtype)
    return out


def _rotate(qk_NMD: torch.Tensor, cos_N1D: torch.Tensor, sin_N1D: torch.Tensor) -> torch.Tensor:
    """Rotary on q and k together, Llama's ``x * cos + rotate_half(x) * sin`` (the half swap
    one ``cat``: as a matmul by a permutation it was a batched matmul per layer)."""
    d = qk_NMD.shape[-1]
    first_NMd, second_NMd = qk_NMD[..., : d // 2], qk_NMD[..., d // 2 :]
    return qk_NMD * cos_N1D + torch.cat((-second_NMd, first_NMd), -1) * sin_N1D


def _add_mlp(x_NH, norm, gate_up: _Proj, down: _Proj, lora, eps: float) -> torch.Tensor:
    """``x`` plus the layer's MLP of it: rmsnorm, the fused gate-up, SiLU-and-multiply, down."""
    gu_NF = _apply(gate_up, _rms_norm(x_NH, norm, eps), lora and lora[2])
    inner = gu_NF.shape[1] // 2
    return x_NH + _apply(down, F.silu(gu_NF[:, :inner]) * gu_NF[:, inner:], lora and lora[3])


def lora_rows(lora: list | None, index: torch.Tensor) -> list | None:
    """``lora_inputs`` terms for the rows ``index`` selects: the factors shared, the row masks
    gathered (a batch's rows from its prefill rows, the live rows of a compacted batch)."""
    if lora is None:
        return None
    return [
        p if p is None or p.mask_BN is None else p._replace(mask_BN=p.mask_BN[index]) for p in lora
    ]


class StaticCache:
    """Keys and values of every layer, [L, B, Hkv, capacity, D], written in place each step.

    Zero-filled, not left uninitialized: a compiled step attends over every column (masked),
    and a masked column's weight 0 times garbage NaN would still be NaN.

    Both live in one flat buffer that goes back to this thread's pool (trinity/engine/pool.py)
    when the cache is dropped or outgrown, and the next cache reuses it; dropping rows
    (``select``) moves the kept ones to the front of the same buffer. Why: a cache is tens of
    MB (the demo model's at batch 16 and 104 columns: 2 x 19 MB), so each new one, and each
    compacted copy, came as fresh pages from the kernel: 10-30 thousand page faults per GRPO
    sampling call, ~0.2 s of 1.9 on a VM."""

    def __init__(self, weights: Weights, keys_LBHTD: torch.Tensor, values_LBHTD: torch.Tensor):
        self.weights = weights
        self.keys = keys_LBHTD
        self.values = values_LBHTD
        self._release = None  # gives the pooled buffer back (weakref.finalize), if there is one

    @classmethod
    def from_layers(cls, weights: Weights, layers, capacity: int) -> StaticCache:
        """A cache holding the prefill's (key, value) per layer, room for ``capacity`` columns."""
        k0 = layers[0][0]
        cache = cls(weights, k0, k0)
        cache._allocate((weights.layers_n, k0.shape[0], k0.shape[1], capacity, k0.shape[3]), k0)
        width = k0.shape[2]
        for i, (k, v) in enumerate(layers):
            cache.keys[i, :, :, :width] = k
            cache.values[i, :, :, :width] = v
        return cache

    def _allocate(self, shape: tuple[int, ...], like: torch.Tensor) -> weakref.finalize | None:
        """Zeroed keys and values of ``shape`` in a pooled buffer. Returns what gives the
        previous buffer back (None if there was none), for the caller to call once it has
        copied out of it."""
        numel = shape[0] * shape[1] * shape[2] * shape[3] * shape[4]
        whole = pool.take(2 * numel, like)
        buffer = whole[: 2 * numel].zero_()
        release = self._release
        self._release = weakref.finalize(self, pool.give_back, pool.free_list(), whole)
        self.keys, self.values = buffer[:numel].view(shape), buffer[numel:].view(shape)
        return release

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def grow(self, capacity: int) -> None:
        old_keys, old_values = self.keys, self.values
        release = self._allocate((*old_keys.shape[:3], capacity, old_keys.shape[4]), old_keys)
        self.keys[:, :, :, : old_keys.shape[3]] = old_keys
        self.values[:, :, :, : old_values.shape[3]] = old_values
        if release is not None:
            release()

    def select(self, index_K: torch.Tensor) -> None:
        self.keys = _select_rows(self.keys, index_K)
        self.values = _select_rows(self.values, index_K)


def _select_rows(cache_LBHTD: torch.Tensor, index_K: torch.Tensor) -> torch.Tensor:
    """``cache[:, index_K]``, written over the front of ``cache``'s own memory (contiguous; a
    new tensor otherwise). Safe layer by layer: layer l's kept rows are read out before they are
    written, and they land before layer l + 1's rows begin (K <= B)."""
    if not cache_LBHTD.is_contiguous():
        return cache_LBHTD[:, index_K]
    layers, rest = cache_LBHTD.shape[0], cache_LBHTD.shape[2:]
    kept = cache_LBHTD.view(-1)[: layers * len(index_K) * rest.numel()]
    kept = kept.view(layers, len(index_K), *rest)
    for layer in range(layers):
        kept[layer].copy_(cache_LBHTD[layer].index_select(0, index_K))
    return kept


class LoraTerm(NamedTuple):
    """A projection's adapters for one batch: ``a_NI`` (A_cat), ``b_ON`` (B_cat, scaling
    folded in), ``mask_BN`` (each row's block of the rank, None when every row has the one
    adapter present), ``b_packed`` (B_cat as the native ``low_rank_add`` takes it:
    [N / S, O, S], S = 2 for bf16, whose pairs it multiplies, else 1), and ``segments`` (for
    the native step: B's nonzero blocks [n, 4], rows (output column, its end, rank column, its
    end), where one adapter's blocks split on pairs; else empty, the whole of B)."""

    a_NI: torch.Tensor
    b_ON: torch.Tensor
    mask_BN: torch.Tensor | None
    b_packed: torch.Tensor
    segments: torch.Tensor


def lora_inputs(weights: Weights, adapters_B: list[str] | None, device) -> list | None:
    """Per projection (layer order, then the head): the ``LoraTerm`` of this batch's adapter
    mix, or None for projections without any of its adapters.

    In the base weights' dtype, cast once per batch: under bf16 autocast every step would
    otherwise cast the fp32 adapter weights again (the matmuls run in bf16 either way, so the
    results are the same). In bf16 an odd total rank gets a zero row in A and column in B (the
    native kernel multiplies pairs)."""
    if adapters_B is None:
        return None
    names = sorted(set(adapters_B))
    projections = [p for layer in weights.layers for p in (layer[1], layer[2], layer[4], layer[5])]
    projections.append(weights.head)
    out = []
    for proj in projections:
        dtype = proj.weight_OI.dtype
        present = [n for n in names if n in proj.a_by]
        if not any(n in present for n in adapters_B):
            out.append(None)
            continue
        a = torch.cat([proj.a_by[n] for n in present]).to(dtype)
        b = torch.cat([proj.b_by[n] for n in present], dim=1).to(dtype)
        pair = 2 if dtype == torch.bfloat16 else 1
        if a.shape[0] % pair:
            a, b = F.pad(a, (0, 0, 0, 1)), F.pad(b, (0, 1))
        packed = b.view(b.shape[0], -1, pair).transpose(0, 1).contiguous()
        if len(names) == 1:  # every row has this adapter
            blocks = proj.blocks_by[names[0]]
            whole = any(c % pair for block in blocks for c in block[2:])
            segments = _ABSENT if whole else torch.tensor(blocks, dtype=torch.long)
            out.append(LoraTerm(a, b, None, packed, segments))
            continue
        mask = torch.zeros(len(adapters_B), a.shape[0], dtype=dtype)
        col = 0
        for n in present:
            r = proj.a_by[n].shape[0]
            rows = [i for i, name in enumerate(adapters_B) if name == n]
            mask[rows, col : col + r] = 1.0
            col += r
        out.append(LoraTerm(a, b, mask.to(device), packed, _ABSENT))
    return out


def decode_step(
    weights: Weights,
    keys_LBHTD: torch.Tensor,
    values_LBHTD: torch.Tensor,
    tokens_B: torch.Tensor,
    position_B: torch.Tensor,
    mask_BT: torch.Tensor,
    column_1: torch.Tensor,
    lora: list | None,
) -> torch.Tensor:
    """Logits [B, V] of one token per row; writes its keys / values at column ``column_1`` (a
    one-element tensor, so a compiled step does not specialize on it) and attends over the
    first ``mask_BT.shape[1]`` columns where ``mask_BT`` (bool) is set."""
    heads, kv_heads, d = weights.heads, weights.kv_heads, weights.head_dim
    batch = tokens_B.shape[0]
    group = heads // kv_heads
    x_BH = F.embedding(tokens_B, weights.embed)
    cos_B1D, sin_B1D = weights.rotary(x_BH, position_B[:, None])
    cos_B1D, sin_B1D = cos_B1D.to(x_BH.dtype), sin_B1D.to(x_BH.dtype)
    if (kernels := _native(weights, keys_LBHTD)) is not None:
        return kernels.decode_step(
            x_BH,
            weights.flat,
            []
            if lora is None
            else [
                _ABSENT if t is None else t
                for term in lora
                for t in (
                    (term.a_NI, term.b_packed, term.mask_BN, term.segments) if term else (None,) * 4
                )
            ],
            keys_LBHTD,
            values_LBHTD,
            cos_B1D[:, 0],
            sin_B1D[:, 0],
            mask_BT,
            int(column_1),
            heads,
            weights.norm_eps,
        )
    attn_mask = mask_BT[:, None, None, :]
    attend = mask_BT.shape[1]
    qk_heads = heads + kv_heads
    eps = weights.norm_eps
    for i, (norm1, qkv, out, norm2, gate_up, down) in enumerate(weights.layers):
        lo = None if lora is None else lora[4 * i : 4 * i + 4]
        h = _rms_norm(x_BH, norm1, eps)
        qkv_BF = _apply(qkv, h, lo and lo[0])
        qk_BND = _rotate(qkv_BF[:, : qk_heads * d].view(batch, qk_heads, d), cos_B1D, sin_B1D)
        keys_LBHTD[i].index_copy_(2, column_1, qk_BND[:, heads:, None])
        values_LBHTD[i].index_copy_(
            2, column_1, qkv_BF[:, qk_heads * d :].view(batch, kv_heads, 1, d)
        )
        # One query per row: a KV group's query heads are the rows of one plain SDPA call.
        q_BGQD = qk_BND[:, :heads].view(batch, kv_heads, group, d)
        att_BGQD = F.scaled_dot_product_attention(
            q_BGQD,
            keys_LBHTD[i, :, :, :attend],
            values_LBHTD[i, :, :, :attend],
            attn_mask=attn_mask,
        )
        x_BH = x_BH + _apply(out, att_BGQD.reshape(batch, heads * d), lo and lo[1])
        x_BH = _add_mlp(x_BH, norm2, gate_up, down, lo, eps)
    h = _rms_norm(x_BH, weights.norm_w, eps)
    return _apply(weights.head, h, None if lora is None else lora[-1])


def prefill(
    weights: Weights,
    input_ids_UT: torch.Tensor,
    mask_UT: torch.Tensor,
    position_UT: torch.Tensor,
    lora: list | None,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The prompts' prefill on the decode layout: logits [U, V] of each row's last position and,
    per layer, (keys, values) [U, Hkv, T, D] (rotary applied; ``StaticCache.from_layers`` input).

    Why: the Hugging Face forward of a 41-token prompt of the demo model cost ~86 ms (its 211
    separate ``F.linear`` calls ~51 ms, module dispatch ~30 ms); here a layer is the decode step's
    ops on all U T tokens as rows: 4 fused matmuls (the engine's small-M kernel up to its row
    limit, ``F.linear`` past it), one causal SDPA, and only the last position reaches the final
    norm and head. Same ops and roundings as ``decode_step`` (and the HF forward): rmsnorm in fp32
    statistics, rotary as ``x * cos + rotate_half(x) * sin`` in the model dtype.

    ``mask_UT``: 1 on real tokens (prompts left-padded). A padded query row attends to itself
    only, not to nothing, so as not to rely on how SDPA treats an all-masked row (zeros in
    PyTorch 2.13's CPU kernels, NaN in a plain softmax): a NaN in a padded column's key or value
    would leak into every later step (weight 0 times NaN). ``lora``: ``lora_inputs`` of the
    U prefill rows; the row masks are repeated per token here."""
    heads, kv_heads, d = weights.heads, weights.kv_heads, weights.head_dim
    rows, width = input_ids_UT.shape
    tokens = rows * width
    qk_heads = heads + kv_heads
    eps = weights.norm_eps
    x_NH = F.embedding(input_ids_UT.reshape(tokens), weights.embed)
    cos_UTD, sin_UTD = weights.rotary(x_NH, position_UT)
    cos_N1D = cos_UTD.to(x_NH.dtype).reshape(tokens, 1, d)
    sin_N1D = sin_UTD.to(x_NH.dtype).reshape(tokens, 1, d)
    per_token = None
    if lora is not None:  # the row masks per token; the head's stay per row (last position)
        per_token = [
            p
            if p is None or p.mask_BN is None
            else p._replace(mask_BN=p.mask_BN.repeat_interleave(width, 0))
            for p in lora[:-1]
        ]
    valid_UT = mask_UT.bool()
    ones_TT = torch.ones(width, width, dtype=torch.bool, device=valid_UT.device)
    attn_mask = (ones_TT.tril() & valid_UT[:, None, :]) | ones_TT.diag().diag()
    attn_mask = attn_mask[:, None]  # [U, 1, T, T]
    layers = []
    for i, (norm1, qkv, out, norm2, gate_up, down) in enumerate(weights.layers):
        lo = None if per_token is None else per_token[4 * i : 4 * i + 4]
        h = _rms_norm(x_NH, norm1, eps)
        qkv_NF = _apply(qkv, h, lo and lo[0])
        qk_NMD = _rotate(qkv_NF[:, : qk_heads * d].view(tokens, qk_heads, d), cos_N1D, sin_N1D)
        qk_UMTD = qk_NMD.view(rows, width, qk_heads, d).transpose(1, 2)
        keys = qk_UMTD[:, heads:]
        values = qkv_NF[:, qk_heads * d :].view(rows, width, kv_heads, d).transpose(1, 2)
        layers.append((keys, values))
        att_UHTD = F.scaled_dot_product_attention(
            qk_UMTD[:, :heads], keys, values, attn_mask=attn_mask, enable_gqa=heads != kv_heads
        )
        att_NF = att_UHTD.transpose(1, 2).reshape(tokens, heads * d)
        x_NH = x_NH + _apply(out, att_NF, lo and lo[1])
        x_NH = _add_mlp(x_NH, norm2, gate_up, down, lo, eps)
    last_UH = x_NH.view(rows, width, -1)[:, -1].contiguous()
    h = _rms_norm(last_UH, weights.norm_w, eps)
    return _apply(weights.head, h, None if lora is None else lora[-1]), layers


def _native(weights: Weights, keys_LBHTD: torch.Tensor):
    """The native build, where it runs this step: on CPU, eager, weights and cache of one dtype."""
    if (
        not FUSED
        or torch.compiler.is_compiling()
        or keys_LBHTD.device.type != "cpu"
        or keys_LBHTD.dtype != weights.flat_dtype
    ):
        return None
    return gemv.kernels()


_COMPILED = None


def compiled_decode_step():
    """``decode_step`` under ``torch.compile`` (inductor, static shapes, one graph for the whole
    layer loop). Inductor's caches go to ``$TRINITY_CACHE_DIR/inductor`` (default
    ``~/.cache/trinity/inductor``) unless ``TORCHINDUCTOR_CACHE_DIR`` is set, so a later process
    reuses the compiled code instead of compiling again."""
    global _COMPILED
    if _COMPILED is None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
        # One graph per (batch bucket, cache capacity, adapter layout): allow more than 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED = torch.compile(decode_step, dynamic=False, fullgraph=True)
    return _COMPILED
