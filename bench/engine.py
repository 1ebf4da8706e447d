"""Engine benchmarks on this machine: ``python bench/engine.py [--quick]``.

Sections (each a function returning markdown lines; add a section by appending to SECTIONS):
- machine: measured bf16 matmul peak (denominator for MFU) and the assumed memory bandwidth;
- sampling: tokens/s of ``trinity.engine.sampling.sample_batch`` vs HF ``generate`` on the demo
  model (SmolLM2-135M-Instruct, bf16) at batch 1 / 16 / 64, with the memory-bandwidth bound;
- training: TODO (tokens/s and MFU of Engine.forward_backward + optim_step).

Results are printed and written to docs/benchmarks.md under "## Engine sampling".
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinker import types  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from trinity.engine.demo_model import ensure_demo_model  # noqa: E402
from trinity.engine.sampling import SampleRequest, sample_batch  # noqa: E402

BANDWIDTH_GBS = 30.0  # this machine's memory bandwidth, as measured by the platform notes


def bf16_matmul_tflops(n: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def machine_section(ctx: dict) -> list[str]:
    ctx["peak_tflops"] = bf16_matmul_tflops()
    return [
        f"- threads: {torch.get_num_threads()}; bf16 matmul peak (2048^3, measured): "
        f"{ctx['peak_tflops']:.2f} TFLOP/s; memory bandwidth assumed {BANDWIDTH_GBS:.0f} GB/s",
    ]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sampling_section(ctx: dict) -> list[str]:
    path = ensure_demo_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound_steps_s = BANDWIDTH_GBS * 1e9 / weight_bytes
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a robot learning to paint."}],
        add_generation_prompt=True, tokenize=True, return_dict=False,
    )
    new_tokens = ctx["new_tokens"]
    eos = [tokenizer.eos_token_id]
    lines = [
        f"Model: SmolLM2-135M-Instruct bf16 ({weight_bytes / 1e6:.0f} MB of weights), prompt "
        f"{len(prompt)} tokens, {new_tokens} new tokens per row (EOS ignored, temperature 1).",
        f"Memory-bandwidth bound: {bound_steps_s:.0f} decode steps/s (weights / "
        f"{BANDWIDTH_GBS:.0f} GB/s), i.e. batch x {bound_steps_s:.0f} tokens/s before the KV cache.",
        "",
        "| batch | trinity tokens/s | HF generate tokens/s | ratio | bound tokens/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    params = types.SamplingParams(max_tokens=new_tokens, temperature=1.0, stop=[], seed=0)
    for batch in ctx["batches"]:
        requests = [SampleRequest(prompt_tokens=list(prompt), num_samples=batch, params=params)]

        def ours(requests=requests):
            sample_batch(model, requests, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id)

        input_ids = torch.tensor([prompt] * batch)

        def hf(input_ids=input_ids):
            with torch.inference_mode():
                model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                               pad_token_id=tokenizer.pad_token_id)

        if batch == ctx["batches"][0]:  # warm up kernels (first bf16 calls are slow) for both
            _timed(ours)
            _timed(hf)
        ours_s = _timed(ours)
        hf_s = _timed(hf)
        ours_tps = batch * new_tokens / ours_s
        hf_tps = batch * new_tokens / hf_s
        lines.append(f"| {batch} | {ours_tps:.0f} | {hf_tps:.0f} | {ours_tps / hf_tps:.2f}x | "
                     f"{batch * bound_steps_s:.0f} |")
        print(lines[-1], flush=True)
    return lines


def training_section(ctx: dict) -> list[str]:
    """Hook for Engine.forward_backward / optim_step tokens/s and MFU (uses ctx['peak_tflops'])."""
    return []


SECTIONS = [("Machine", machine_section), ("Engine sampling", sampling_section),
            ("Engine training", training_section)]


def write_section(title: str, lines: list[str], doc: Path) -> None:
    """Replace (or append) the ``## title`` section of docs/benchmarks.md."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    body = f"## {title}\n\n" + "\n".join(lines) + "\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: body + "\n", text) if pattern.search(text) else (
        text.rstrip("\n") + "\n\n" + body)
    doc.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="batch 1 and 16, 32 new tokens")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    ctx = {"new_tokens": 32 if args.quick else 64, "batches": [1, 16] if args.quick else [1, 16, 64]}
    machine = machine_section(ctx)
    print("\n".join(machine))
    for title, section in SECTIONS[1:]:
        lines = section(ctx)
        if not lines:
            continue
        lines = machine + [""] + lines
        print(f"\n## {title}\n" + "\n".join(lines))
        if not args.no_write:
            write_section(title, lines, ROOT / "docs" / "benchmarks.md")


if __name__ == "__main__":
    main()
