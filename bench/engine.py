"""Engine benchmarks on this machine: ``python bench/engine.py [--quick]``.

Sections (each a function returning markdown lines; add a section by appending to SECTIONS):
- machine: measured matmul peak in the engine's dtype (bf16 where native, else fp32) (denominator
  for MFU) and measured memory bandwidth (a gemv over a decode-sized weight);
- sampling speed: tokens/s of ``sample_batch`` on the fast decode path, on the reference path and
  of HF ``generate`` on the demo model (SmolLM2-135M-Instruct, engine dtype) at batch 1 / 16 / 64,
  side by side, each as a fraction of the bound (memory bandwidth at batch 1, matmul peak at 64);
- training: tokens/s and MFU of ``Engine.forward_backward`` + ``optim_step`` on the demo model,
  full fine-tuning and LoRA rank 32, batch 8 x 512 (``--quick``: 2 x 128), and LoRA rank 32 on
  GRPO-shaped datums (4 prompts x 4 responses, one packed pass).

Results are printed and written to docs/benchmarks.md, one "## title" section each.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinker import types  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from trinity.engine import configure_process, fast_decode, gemv  # noqa: E402
from trinity.engine.demo_model import ensure_demo_model  # noqa: E402
from trinity.engine.forward import default_dtype  # noqa: E402
from trinity.engine.sampling import SampleRequest, sample_batch  # noqa: E402


def machine_section(ctx: dict) -> list[str]:
    gemv.build()  # before any timing (minutes where missing), so the kernel columns are the kernel
    ctx["dtype"] = ctx.get("dtype") or default_dtype(torch.device("cpu"))  # the engine's dtype
    ctx["peak_tflops"] = matmul_peak_tflops(ctx["dtype"])
    ctx["bandwidth_gbs"] = memory_bandwidth_gbs(ctx["dtype"])
    lines = [
        f"- threads: {torch.get_num_threads()}; engine dtype {ctx['dtype']}: matmul peak "
        f"(measured, best of trials) {ctx['peak_tflops']:.3f} TFLOP/s; memory bandwidth "
        f"{ctx['bandwidth_gbs']:.1f} GB/s (the largest of a streaming read of 256 MB and the "
        f"engine's gemv over a {GEMV_SHAPE[0]} x {GEMV_SHAPE[1]} weight, the access pattern of "
        f"a decode step, on 4 KB and on huge pages); load average {os.getloadavg()[0]:.1f}",
    ]
    return lines + dtype_lines()


GEMV_SHAPE = (49152, 576)  # the demo model's unembedding: 113 MB in fp32, past any cache


def _best(fn, trials: int = 8) -> float:
    """Fastest of ``trials`` timed calls after one warm-up: on a shared machine the best trial
    is the closest estimate of what the cores can do (a mean folds in other tenants' load)."""
    fn()
    return min(_timed(fn) for _ in range(trials))


def gemv_bandwidth_gbs(dtype: torch.dtype, kernel: bool = True, huge_pages: bool = False) -> float:
    """Weight bytes per second of a one-row ``x @ W.T`` over the unembedding's shape: through
    the engine's kernel (trinity/engine/gemv.py), or ``F.linear`` (``kernel=False``); the weight
    on 4 KB pages, or on transparent huge pages as the decode layout holds its weights."""
    w = torch.randn(GEMV_SHAPE, dtype=dtype)
    if huge_pages:
        w = fast_decode.huge_page_copies([w])[0]
    x = torch.randn(1, GEMV_SHAPE[1], dtype=dtype)
    fn = (lambda: gemv.linear(x, w, None)) if kernel else (lambda: F.linear(x, w))
    return w.numel() * w.element_size() / _best(fn) / 1e9


def memory_bandwidth_gbs(dtype: torch.dtype) -> float:
    """The machine's read bandwidth: the largest of a streaming read (``sum`` of 256 MB of fp32)
    and the engine's gemv in ``dtype`` on 4 KB and on huge pages, so the batch-1 bound is not one
    kernel's shortfall, nor 4 KB pages' where the decode weights are on huge pages."""
    buf = torch.ones(64 * 2**20)
    read = buf.numel() * 4 / _best(buf.sum, trials=4) / 1e9
    return max(read, gemv_bandwidth_gbs(dtype), gemv_bandwidth_gbs(dtype, huge_pages=True))


def dtype_lines() -> list[str]:
    """fp32 beside bf16 on this CPU: matmul peak, gemv with F.linear and with the engine's
    kernel: what ``default_dtype``'s choice rests on."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        cells = [
            f"{matmul_peak_tflops(dtype):.3f}",
            f"{gemv_bandwidth_gbs(dtype, kernel=False):.1f}",
            f"{gemv_bandwidth_gbs(dtype):.1f}",
            f"{gemv_bandwidth_gbs(dtype, huge_pages=True):.1f}",
        ]
        rows.append(f"| {str(dtype).removeprefix('torch.')} | {' | '.join(cells)} |")
    return [
        "",
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, AVX512-BF16 "
        f"{torch.cpu._is_avx512_bf16_supported()}, AMX {torch.cpu._is_amx_tile_supported()}.",
        "",
        "| dtype | matmul 1024^3 TFLOP/s | gemv F.linear GB/s | gemv engine kernel GB/s "
        "| same, weight on huge pages GB/s |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ]


CLOCK = time.perf_counter  # ``--cpu-time``: time.process_time
CLOCK_NAMES = {
    time.perf_counter: "the wall clock",
    time.process_time: "this process's CPU time (`--cpu-time`, 1 thread: the time it ran, not "
    "the time other jobs on the shared cores held it off)",
}


def _timed(fn) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def switched(module, name: str, value, fn) -> None:
    """``fn()`` with ``module.name`` set to ``value``, restored after."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        fn()
    finally:
        setattr(module, name, saved)


def without_kernel(fn) -> None:
    """``fn()`` with trinity/engine/gemv.py's build off (one-row matmuls by ``F.linear``, the
    step by torch ops)."""
    gemv.kernels()  # loaded first, so that restoring it restores the build
    switched(gemv, "_KERNEL", False, fn)


def op_by_op(fn) -> None:
    """``fn()`` with the decode step and the sampler as torch ops (one-row matmuls still by the
    gemv) instead of the native ones (trinity/engine/kernels.cpp)."""
    switched(fast_decode, "FUSED", False, fn)


def attention_lines(ctx: dict, model, width: int, batch: int = 64) -> list[str]:
    """The native one-query attention beside the SDPA call of the op-by-op step, one layer of
    ``model``'s shape at ``batch`` rows over ``width`` cached columns (the bench's last step)."""
    config = model.config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = config.hidden_size // heads
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, (heads + 2 * kv) * d, generator=g).to(ctx["dtype"])
    keys = torch.randn(batch, kv, width + 64, d, generator=g).to(ctx["dtype"])
    values = torch.randn_like(keys)
    mask = torch.ones(batch, width, dtype=torch.bool)
    kernels = gemv.kernels()
    q = qkv[:, : heads * d].view(batch, kv, heads // kv, d)

    def sdpa():
        F.scaled_dot_product_attention(
            q, keys[:, :, :width], values[:, :, :width], attn_mask=mask[:, None, None, :]
        )

    def native():
        kernels.attend(qkv, keys, values, mask, width, heads)

    sdpa_s, native_s = (
        _best(lambda fn=fn: [fn() for _ in range(20)]) / 20 for fn in (sdpa, native)
    )
    return [
        f"Attention, one layer at batch {batch} ({heads} query heads over {kv} KV heads of {d}, "
        f"{width} cached columns, {str(ctx['dtype']).removeprefix('torch.')}): SDPA "
        f"{1e3 * sdpa_s:.2f} ms, the native kernel {1e3 * native_s:.2f} ms "
        f"({sdpa_s / native_s:.1f}x); x {config.num_hidden_layers} layers per step."
    ]


def sampling_section(ctx: dict) -> list[str]:
    """Tokens/s of the fast decode path, the reference path and HF ``generate``, side by side.

    The three run interleaved per batch size (fast, reference, HF, repeated; best of the
    repeats), in one process, so they see the same background load. Bounds: a batch-1 step must
    stream every weight once (weights / measured bandwidth); a batch-64 step is compute bound
    (2 x matmul parameters FLOPs per token at the measured matmul peak). Both are re-measured
    after the runs and the larger taken, so a fraction is conservative.
    """
    path = ensure_demo_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=ctx["dtype"]).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a robot learning to paint."}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    new_tokens = ctx["new_tokens"]
    eos = [tokenizer.eos_token_id]
    params = types.SamplingParams(max_tokens=new_tokens, temperature=1.0, stop=[], seed=0)
    results, first_call_s = {}, {}
    for batch in ctx["batches"]:
        requests = [SampleRequest(prompt_tokens=list(prompt), num_samples=batch, params=params)]
        input_ids = torch.tensor([prompt] * batch)

        def run(fast, compiled=False, requests=requests):
            sample_batch(
                model,
                requests,
                eos_token_ids=eos,
                pad_token_id=tokenizer.pad_token_id,
                fast=fast,
                compiled=compiled,
            )

        def hf(input_ids=input_ids):
            with torch.inference_mode():
                model.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    pad_token_id=tokenizer.pad_token_id,
                )

        runners = {"fast": lambda: run(True), "reference": lambda: run(False), "hf": hf}
        runners["fast op-by-op"] = lambda: op_by_op(lambda: run(True))
        if batch == 1:  # the batch-1 lever: the same fast path with F.linear's gemv
            runners["fast F.linear"] = lambda: without_kernel(lambda: run(True))
        if batch == ctx["batches"][0]:  # warm up kernels and the fused-weight cache
            for fn in runners.values():
                fn()
        if ctx["compiled"]:  # its first call at a batch size compiles (or loads from disk)
            runners["compiled"] = lambda: run(True, compiled=True)
            first_call_s[batch] = _timed(runners["compiled"])
        best = dict.fromkeys(runners, float("inf"))
        for _ in range(ctx["sample_repeats"]):
            for name, fn in runners.items():
                best[name] = min(best[name], _timed(fn))
        results[batch] = {name: batch * new_tokens / s for name, s in best.items()}
        print(batch, results[batch], flush=True)
    # The gemv over huge pages, as the decode weights are held, for the batch-1 arithmetic; it
    # counts towards the bound too, so no figure below beats the bandwidth it is divided by.
    kernel_gbs = gemv_bandwidth_gbs(ctx["dtype"], huge_pages=True)
    bandwidth = max(ctx["bandwidth_gbs"], memory_bandwidth_gbs(ctx["dtype"]), kernel_gbs)
    peak = max(ctx["peak_tflops"], matmul_peak_tflops(ctx["dtype"]))
    memory_tps = bandwidth * 1e9 / weight_bytes  # per row, before the KV cache
    compute_tps = peak * 1e12 / (2 * matmul_params)
    lines = [
        f"Model: SmolLM2-135M-Instruct {ctx['dtype']} ({weight_bytes / 1e6:.0f} MB of weights, "
        f"{matmul_params / 1e6:.0f} M matmul parameters), prompt {len(prompt)} tokens, "
        f"{new_tokens} new tokens per row (EOS ignored, temperature 1), best of "
        f"{ctx['sample_repeats']} interleaved runs per path, every time (runs and the bounds' "
        f"trials) by {CLOCK_NAMES[CLOCK]}.",
        f"Bandwidth at the end: {bandwidth:.1f} GB/s, matmul peak {peak:.3f} TFLOP/s (the largest "
        "of the measurements before and after the runs).",
        f"Memory-bandwidth bound: {bandwidth:.1f} GB/s / {weight_bytes / 1e6:.0f} MB = "
        f"{memory_tps:.1f} decode steps/s, i.e. batch x {memory_tps:.1f} tokens/s.",
        f"Compute bound: {peak * 1e3:.0f} GFLOP/s / (2 x {matmul_params / 1e6:.0f} M FLOPs per "
        f"token) = {compute_tps:.0f} tokens/s at any batch.",
        "Bound per batch = min(memory, compute); % = tokens/s / that bound. Paths: fast = "
        "`sample_batch(fast=True)` (trinity/engine/fast_decode.py, eager), reference = "
        "`sample_batch(fast=False)` (Hugging Face forward per step, same sampler), HF = "
        "`generate` (prefills every row; the engine prefills a shared prompt once).",
        "",
        "| batch | bound tokens/s | fast tokens/s (% of bound) | reference tokens/s (%) "
        "| HF generate tokens/s (%) | fast / reference | fast / HF |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, tps in results.items():
        bound = min(batch * memory_tps, compute_tps)
        cells = [f"{tps[n]:.1f} ({100 * tps[n] / bound:.0f}%)" for n in ("fast", "reference", "hf")]
        lines.append(
            f"| {batch} | {bound:.1f} | {' | '.join(cells)} | "
            f"{tps['fast'] / tps['reference']:.2f}x | {tps['fast'] / tps['hf']:.2f}x |"
        )
    if first_call_s:
        lines += [
            "",
            "Compiled step (`compiled=True`; inductor cache in TORCHINDUCTOR_CACHE_DIR, default "
            "~/.cache/trinity/inductor): first call at each batch size (compilation, or loading "
            "from the disk cache when an earlier run compiled that shape), then steady speed.",
            "",
            "| batch | first call s | compiled tokens/s (% of bound) | compiled / fast eager |",
            "|---:|---:|---:|---:|",
        ]
        for batch, tps in results.items():
            bound = min(batch * memory_tps, compute_tps)
            lines.append(
                f"| {batch} | {first_call_s[batch]:.1f} | {tps['compiled']:.1f} "
                f"({100 * tps['compiled'] / bound:.0f}%) | {tps['compiled'] / tps['fast']:.2f}x |"
            )
    lines += [
        "",
        "The native step lever side by side (fast = one C++ call per step and the native sampler, "
        "trinity/engine/kernels.cpp; op-by-op = the same step as torch ops and the torch sampler, "
        "one-row matmuls still by the gemv): "
        + "; ".join(
            f"batch {batch} {tps['fast']:.1f} vs {tps['fast op-by-op']:.1f} tokens/s "
            f"({tps['fast'] / tps['fast op-by-op']:.2f}x)"
            for batch, tps in results.items()
        )
        + ".",
        *attention_lines(ctx, model, len(prompt) + new_tokens),
    ]
    if 1 in results:
        tps = results[1]
        lines += [
            f"Batch 1, the gemv lever side by side: fast path {tps['fast']:.1f} tokens/s with the "
            f"engine's build, {tps['fast F.linear']:.1f} without it (torch ops, `F.linear`) "
            f"({tps['fast'] / tps['fast F.linear']:.2f}x).",
        ]
    return (
        lines
        + ["", *target_lines(results, weight_bytes, kernel_gbs, memory_tps, compute_tps)]
        + [
            "",
            "\n\n".join(SAMPLING_NOTES),
        ]
    )


def target_lines(results, weight_bytes, kernel_gbs, memory_tps, compute_tps) -> list[str]:
    """Issue 16's three sampling targets against this run, with the arithmetic of each miss:
    where the step's time goes beside what the bound allows."""
    lines = ["Targets (issue 16): >= 60 % of the bound at batch 1, >= 40 % at batch 64, >= 3x HF."]
    if 1 in results:
        step_ms = 1e3 / results[1]["fast"]
        lines.append(
            f"- batch 1: {100 * results[1]['fast'] / memory_tps:.0f} % (target 60 %). A step "
            f"takes {step_ms:.1f} ms; the bound {1e3 / memory_tps:.1f} ms ({weight_bytes / 1e6:.0f}"
            f" MB at the memory bandwidth); the weights (on huge pages) through the engine's "
            f"gemv at its own {kernel_gbs:.1f} GB/s take {weight_bytes / kernel_gbs / 1e6:.1f} ms, so "
            f"{max(0.0, step_ms - weight_bytes / kernel_gbs / 1e6):.1f} ms are the other ops, "
            "the sampler and the Python around them."
        )
    big = max(results)
    if big > 1:
        tps = results[big]
        bound = min(big * memory_tps, compute_tps)
        lines.append(
            f"- batch {big}: {100 * tps['fast'] / bound:.0f} % (target 40 %): a step of "
            f"{big} tokens takes {1e3 * big / tps['fast']:.0f} ms; its matmuls at the measured "
            f"peak would take {1e3 * big / compute_tps:.0f} ms."
        )
        lines.append(f"- batch {big} vs HF generate: {tps['fast'] / tps['hf']:.2f}x (target 3x).")
    return lines


SAMPLING_NOTES = [
    "The fast path (trinity/engine/fast_decode.py): prefill on the same fused layout "
    "(`fast_decode.prefill`; the Hugging Face forward where prompt logprobs are wanted), "
    "then each step is, per layer, rmsnorm, one fused QKV matmul, rotary on q and k together "
    "(`x * cos + rotate_half(x) * sin`), two in-place writes into a preallocated static KV cache "
    "(grown by doubling, never per step), attention over the valid prefix, the output "
    "matmul, rmsnorm, one fused gate-up matmul, SiLU-and-multiply, the down matmul; LoRA "
    "adapters of a batch are concatenated along the rank and masked per row (two extra "
    "matmuls per projection whatever the mix). With the engine's native build (trinity/engine/"
    "kernels.cpp, `python -m trinity.engine`) the whole step after the embedding is one C++ "
    "call: the residual add fused into the next rmsnorm, rotary into the cache writes, a "
    "one-query GQA attention (fp32 softmax, one pass over each row's keys and one over its "
    "values) instead of SDPA, SiLU-and-multiply in one pass, one-row matmuls by the gemv, "
    "larger ones by `at::linear`, the decode weights on transparent huge pages; without it "
    "(op-by-op) the same ops are torch calls. Sampling is batched on the device for both "
    "paths (temperature / top-k / top-p as per-row tensors, one sort for the filtering rows "
    "only, a counter-based splitmix64 uniform per (row seed, step) instead of a generator "
    "per row, stop ids compared as a tensor, one host sync per step); stopped rows are "
    "compacted away when the live ones fit in 3/4 of the batch. With the native build, rows "
    "that no top-k / top-p filters and no top-k logprobs are chosen by one native call (max, "
    "exps with block sums, a blocked inverse-CDF search: three passes over a row instead of "
    "eight), on both paths.",
    "Exactness: every test of tests/test_engine_sampling.py runs on both paths (teacher-forced "
    "logprobs within 1e-4, fp32), and tests/test_engine_fast_decode.py checks fast = "
    "reference (same greedy and seeded tokens, logprobs within 1e-4) with mixed LoRA "
    "adapters per row, rows stopping at different steps and a cache that must grow, with the "
    "native build and without it; tests/test_engine_decode_kernels.py checks each native kernel "
    "against the torch ops it replaces (fp32 and bf16, GQA, valid lengths 1 to 70, batch 1 and "
    ">1), the native step against the op-by-op step (with LoRA, with biases) and the sampler "
    "against the exact inverse CDF.",
]


def matmul_peak_tflops(dtype: torch.dtype, n: int = 1024, trials: int = 8) -> float:
    """Best of ``trials`` timed n^3 matmuls in ``dtype`` (see ``_best``)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / _best(lambda: a @ b, trials) / 1e12


# A full fine-tune's first two steps touch fresh memory (gradients, then AdamW's moments and
# what the allocator moves around them): at 2 x 128 tokens its second step page-faulted 167k
# times (1.2 s of system time) and took 1.7x the steady step, which from the third step on
# faults ~0.03 s' worth; so --quick's one measured step comes after two warm-up steps.
WARMUP_STEPS = 2


def training_section(ctx: dict) -> list[str]:
    """Tokens/s and MFU of ``Engine.forward_backward`` + ``optim_step`` (cross_entropy).

    Model FLOPs per token, matmuls only (attention scores excluded, so MFU is conservative):
    full fine-tuning 6 N (forward 2 N, backward 4 N); LoRA 4 N + 6 N_lora (forward 2 N and the
    input-gradient half of the backward, 2 N; the frozen base needs no weight gradients; the
    adapters cost a full 6 per parameter). N counts the tied embedding once, i.e. the lm_head
    matmul. MFU divides by the matmul peak of the engine's dtype: the best of several timed
    matmuls before and after the runs (the machine is shared, so timings move with other
    tenants' load; the step time reported is the median step).
    """
    from tinker import types as ttypes

    from trinity.engine import Engine, LoraSpec

    batch, length = ctx["train_shape"]
    engine = Engine("demo", dtype=ctx.get("train_dtype"))
    n_params = sum(p.numel() for p in engine.base.parameters())
    g = torch.Generator().manual_seed(0)

    def datum(seq: list[int], scored_from: int = 0) -> ttypes.Datum:
        weights = [0.0] * scored_from + [1.0] * (len(seq) - 1 - scored_from)
        return ttypes.Datum(
            model_input=ttypes.ModelInput.from_ints(seq[:-1]),
            loss_fn_inputs={"target_tokens": seq[1:], "weights": weights},
        )

    vocab = len(engine.tokenizer)
    datums = [
        datum(torch.randint(0, vocab, (length + 1,), generator=g).tolist()) for _ in range(batch)
    ]
    tokens = batch * length
    # GRPO's shape (bench/grpo_step.py): 4 prompts of 38 tokens x 4 responses of 8-64 tokens,
    # one packed pass (each prompt once, no padding); its tokens count each prompt once.
    grpo_datums, grpo_tokens = [], 0
    for _ in range(4):
        prompt = torch.randint(0, vocab, (38,), generator=g).tolist()
        grpo_tokens += len(prompt)
        for _ in range(4):
            n = int(torch.randint(8, 65, (1,), generator=g))
            grpo_datums.append(
                datum(prompt + torch.randint(0, vocab, (n,), generator=g).tolist(), 37)
            )
            grpo_tokens += n - 1
    adam = ttypes.AdamParams(learning_rate=1e-5)
    lines = [
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} "
        f"threads, load average {os.getloadavg()[0]:.1f} at the start (other processes share "
        "these cores; every figure below moves with their load).",
        f"Model: SmolLM2-135M-Instruct ({n_params / 1e6:.0f} M parameters), engine dtype "
        f"{str(engine.dtype).removeprefix('torch.')} (`default_dtype`: bf16 only where the CPU "
        f"has AMX / AVX512-BF16), batch {batch} x {length} tokens (GRPO-shaped: 4 prompts of 38 "
        f"tokens x 4 responses of 8-64, {grpo_tokens} tokens with each prompt once), "
        "cross_entropy; "
        f"median of {ctx['train_repeats']} steps after {WARMUP_STEPS} warm-up steps, the two "
        f"models' steps interleaved, timed by {CLOCK_NAMES[CLOCK]}.",
        "FLOPs/token: full 6 N; LoRA 4 N + 6 N_lora (see bench/engine.py). MFU = achieved / "
        "best-of-trials matmul peak of that dtype, measured before and after the runs.",
        "",
        "| model | trainable params | fwd+bwd s | optim s | tokens/s | achieved TFLOP/s "
        "| peak TFLOP/s | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lora_spec = LoraSpec(rank=32, seed=0)
    runs = {  # label: (LoRA spec or None for full fine-tuning, datums, tokens)
        "full fine-tune": (None, datums, tokens),
        "LoRA rank 32": (lora_spec, datums, tokens),
        "LoRA rank 32, GRPO-shaped": (lora_spec, grpo_datums, grpo_tokens),
    }
    steps: dict[str, list[tuple[float, float, float]]] = {label: [] for label in runs}
    for label, (spec, _, _) in runs.items():
        engine.create_model(label, spec)
    peaks = {dtype: matmul_peak_tflops(dtype) for dtype in (torch.float32, torch.bfloat16)}
    # Interleaved (full, LoRA, GRPO-shaped, full, ...) so all see the same background load.
    for _ in range(ctx["train_repeats"] + WARMUP_STEPS):
        for label, (_, run_datums, _) in runs.items():
            fb = _timed(
                lambda label=label, d=run_datums: engine.forward_backward(label, d, "cross_entropy")
            )
            opt = _timed(lambda label=label: engine.optim_step(label, adam))
            steps[label].append((fb + opt, fb, opt))
    peaks = {dtype: max(best, matmul_peak_tflops(dtype)) for dtype, best in peaks.items()}
    peak = peaks[engine.dtype]
    for label, (spec, _, run_tokens) in runs.items():
        trainable = engine.model_info(label)["trainable_parameters"]
        if spec is not None:
            lora = trainable  # for the arithmetic below
        per_token = 6 * n_params if spec is None else 4 * n_params + 6 * trainable
        measured = sorted(steps[label][WARMUP_STEPS:])
        total, fb, opt = measured[len(measured) // 2]
        achieved = run_tokens * per_token / total / 1e12
        lines.append(
            f"| {label} | {trainable / 1e6:.2f} M | {fb:.2f} | {opt:.2f} | "
            f"{run_tokens / total:.0f} | {achieved:.3f} | {peak:.3f} | "
            f"{100 * achieved / peak:.0f}% |"
        )
        print(lines[-1], flush=True)
        engine.remove_model(label)
    fp32, bf16 = (peaks[dtype] for dtype in (torch.float32, torch.bfloat16))
    lines += [
        "",
        f"- FLOPs per step: full 6 x {n_params / 1e6:.1f} M x {tokens} tokens = "
        f"{6 * n_params * tokens / 1e12:.2f} TFLOP; LoRA (4 N + 6 x {lora / 1e6:.1f} M) x "
        f"{tokens} = {tokens * (4 * n_params + 6 * lora) / 1e12:.2f} TFLOP (adapters' share "
        f"{6 * lora / (4 * n_params + 6 * lora):.0%}); target MFU >= 50 %",
        f"- matmul peaks measured in this run (best of trials, 1024^3): fp32 {fp32:.3f}, bf16 "
        f"{bf16:.3f} TFLOP/s (bf16 / fp32 = {bf16 / fp32:.1f}x); the engine computes in "
        f"{str(engine.dtype).removeprefix('torch.')}",
    ]
    return lines + ["", *TRAINING_NOTES]


TRAINING_NOTES = [
    "What the engine does for speed (trinity/engine): logprobs of the targets through a chunked "
    "unembedding kernel (no full-vocabulary fp32 logits; the forward keeps the probabilities in "
    "the matmul dtype, so the backward needs no second logits matmul; a frozen unembedding gets "
    "no weight gradient; where the native kernels are built, the logits go straight into the "
    "kept probabilities and one kernel per chunk makes the softmax and its sums, one the "
    "logits' gradient), training attention by query blocks of batched matmuls, the mask and "
    "scale inside the scores' matmul, or for a packed pass of prompts and responses one "
    "padded batch of them (trinity/engine/attention.py: PyTorch's CPU "
    "flash-attention backward ran at a few GFLOP/s), LoRA linears fused into one autograd "
    "function per layer (trinity/engine/lora_linear.py), Llama's RMSNorm and SiLU-and-multiply "
    "as native functions of one pass over the rows each way (trinity/engine/fused_layers.py), "
    "fused torch AdamW (one memory pass), micro-batches of 2048 tokens, and "
    "`configure_process` keeping freed memory (glibc otherwise unmaps every freed tensor of "
    "more than 128 KiB, and the page faults of the next allocation made an elementwise op into "
    "a fresh 4 MiB tensor 10x slower on a VM, a rank-32 LoRA matmul 6x). bf16 is used only "
    "where the CPU computes it natively: without AVX512-BF16 / AMX a bf16 matmul runs at well "
    "under 1 GFLOP/s. torch.compile is not used (minutes of compilation on 2 cores, and peft "
    "adapters come and go at run time). Datums that share a prompt run it once, several prompts "
    "and their responses packed in one row without padding (the GRPO-shaped row).",
]


SECTIONS = [
    ("Machine", machine_section),
    ("Sampling speed", sampling_section),
    ("Engine training", training_section),
]


def write_section(title: str, lines: list[str], doc: Path) -> None:
    """Replace (or append) the ``## title`` section of docs/benchmarks.md."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    body = f"## {title}\n\n" + "\n".join(lines) + "\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _: body + "\n", text)
        if pattern.search(text)
        else (text.rstrip("\n") + "\n\n" + body)
    )
    doc.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="batch 1 and 16, 32 new tokens")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--only", choices=["sampling", "training"], help="run one section")
    parser.add_argument(
        "--train-dtype", choices=["float32", "bfloat16"], help="engine dtype for training"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per sampled row")
    parser.add_argument("--compiled", action="store_true", help="also the compiled decode step")
    parser.add_argument("--repeats", type=int, help="interleaved sampling runs per path (best)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by this process's CPU time (with --threads 1: the time its thread ran, "
        "not the time other jobs on shared cores held it off)",
    )
    args = parser.parse_args()
    if args.cpu_time:
        if args.threads != 1:
            parser.error("--cpu-time: expected --threads 1 (CPU time sums every thread)")
        global CLOCK
        CLOCK = time.process_time
    torch.set_num_threads(args.threads)
    configure_process()
    ctx = {
        "new_tokens": args.new_tokens or (32 if args.quick else 64),
        "sample_repeats": args.repeats or (1 if args.quick else 2),
        "compiled": args.compiled,
        "batches": [1, 16] if args.quick else [1, 16, 64],
        "train_shape": (2, 128) if args.quick else (8, 512),
        "train_repeats": 1 if args.quick else 3,
        "train_dtype": getattr(torch, args.train_dtype) if args.train_dtype else None,
    }
    machine = machine_section(ctx)
    print("\n".join(machine))
    for title, section in SECTIONS[1:]:
        if args.only and args.only not in title.lower():
            continue
        lines = section(ctx)
        if not lines:
            continue
        lines = machine + [""] + lines
        print(f"\n## {title}\n" + "\n".join(lines))
        if not args.no_write:
            write_section(title, lines, ROOT / "docs" / "benchmarks.md")


if __name__ == "__main__":
    main()
