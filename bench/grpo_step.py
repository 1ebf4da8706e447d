"""Wall time per GRPO step: Trinity (local backend) vs TRL's ``GRPOTrainer``, side by side.

    pip install trl --no-deps      # the benchmark's only extra; not a Trinity dependency
    python bench/grpo_step.py [--steps 4] [--rounds 2]

Identical shapes on both sides: the demo model (SmolLM2-135M-Instruct) in the engine's dtype
(bf16 where the CPU has it natively, else fp32) on both sides, the same
arithmetic prompts, 4 prompts x 4 samples per step, at most 64 new tokens (both stop at EOS; the
mean completion length of each side is reported next to its time), LoRA rank 32 / alpha 32 on
the decoder's linear layers (peft's "all-linear" leaves the output head out, so Trinity's side
sets ``train_unembed: false``), one optimizer step per batch, no KL term, no gradient
checkpointing. The first step of each side is warm-up and not counted. ``--rounds`` (default 2) runs Trinity then TRL that
many times and pools each side's timed steps (the machine drifts between runs: TRL's step moved
from 17 to 20 s). Each side runs in a fresh process of its own: a
second OpenMP team in one process (the matmul-peak trial's, or the other side's worker thread's)
makes libgomp count more threads than CPUs and throttle every team's spin-wait, so the threads
sleep and wake between parallel regions (tens of thousands of context switches per sampling
call; Trinity's sampling 1.8 -> 2.9 s). The roofline line divides each side's matmul
work (``step_tflop``) by the matmul peak measured in the same run.
Results go to docs/benchmarks.md under "GRPO step vs TRL".
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS_PER_STEP = 4
SAMPLES_PER_PROMPT = 4
NEW_TOKENS = 64
RANK = 32
LR = 1e-5


def prompts(n: int) -> list[dict]:
    from trinity.buffer.procedural import build_builtin

    rows = build_builtin("arithmetic", {"size": n, "seed": 0})
    return [{"question": r["question"], "answer": str(r["answer"])} for r in rows]


def accuracy(text: str, answer: str) -> float:
    return float(text.strip().split("\n")[0].strip() == answer)


def run_trl(model_path: str, rows: list[dict], steps: int) -> tuple[list[float], list[float]]:
    """Seconds and mean completion length of each step."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trinity.engine.forward import default_dtype

    def reward(completions, answer, **_):
        return [accuracy(c[0]["content"], a) for c, a in zip(completions, answer, strict=True)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.lengths: list[float] = []
            self.start = 0.0

        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(float(logs["completions/mean_length"]))

    dtype = default_dtype(torch.device("cpu"))  # the dtype Trinity's engine computes in here
    data = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]}
            for r in rows
        ]
    )
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out,
            use_cpu=True,
            bf16=dtype == torch.bfloat16,
            max_steps=steps,
            learning_rate=LR,
            per_device_train_batch_size=PROMPTS_PER_STEP * SAMPLES_PER_PROMPT,
            num_generations=SAMPLES_PER_PROMPT,
            max_completion_length=NEW_TOKENS,
            beta=0.0,
            gradient_checkpointing=False,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            model_init_kwargs={"dtype": dtype},
            seed=0,
        )
        trainer = GRPOTrainer(
            model=model_path,
            reward_funcs=reward,
            args=args,
            train_dataset=data,
            peft_config=LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear"),
            callbacks=[timer],
        )
        trainer.train()
    return timer.times, timer.lengths


def run_trinity(model_path: str, rows: list[dict], steps: int) -> tuple[list[float], list[float]]:
    """Seconds and mean completion length of each step."""
    from trinity.config import load_config
    from trinity.launcher.launcher import run
    from trinity.monitor import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prompts.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = load_config(
            ROOT / "bench" / "grpo_step.yaml",
            overrides=[
                f"checkpoint_root_dir={tmp}/ckpt",
                f"model.model_path={model_path}",
                f"buffer.total_steps={steps}",
                f"buffer.explorer_input.taskset.path={data}",
            ],
        )
        run(config)
        metrics = read_metrics(Path(config.checkpoint_job_dir) / "monitor" / "metrics.jsonl")
        trained = [m for m in metrics if "perf/time_per_step" in m]
        return (
            [m["perf/time_per_step"] for m in trained],
            [m["response_length/mean"] for m in trained],
        )


def in_fresh_process(side, model_path: str, rows: list[dict], steps: int):
    """``side(model_path, rows, steps)`` in a spawned process (no OpenMP team but its own), with
    the allocator set as ``trinity run`` sets it, for both sides alike."""
    from concurrent.futures import ProcessPoolExecutor

    from trinity.engine import configure_process

    with ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"), initializer=configure_process
    ) as pool:
        return pool.submit(side, model_path, rows, steps).result()


def prompt_tokens(model_path: str, rows: list[dict]) -> float:
    """Mean prompt length in tokens, chat template applied (what both sides feed the model)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["question"]}], add_generation_prompt=True, tokenize=False
        )
        for r in rows
    ]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return statistics.mean(lengths)


def step_tflop(n_params: int, prompt: float, completion: float, shared_prompt: bool) -> float:
    """Matmul work of one step, N the model's parameters (the tied unembedding once):
    2 N per token through the forward (prefill and decoding), 4 N per token through the LoRA
    forward/backward (the frozen base needs input gradients only; the adapters' 6 N_lora is
    ~1 % and left out, as are the attention scores, so the floor is conservative). With
    ``shared_prompt`` a prompt runs once per group, in the prefill and in training."""
    rows = PROMPTS_PER_STEP * SAMPLES_PER_PROMPT
    prompts = PROMPTS_PER_STEP if shared_prompt else rows
    tokens = prompts * prompt + rows * completion
    return (2 * n_params * tokens + 4 * n_params * tokens) / 1e12


def main() -> None:
    import torch

    from bench.engine import matmul_peak_tflops, write_section
    from trinity.engine import configure_process
    from trinity.engine.demo_model import ensure_demo_model
    from trinity.engine.forward import default_dtype

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per side, first is warm-up")
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds of Trinity then TRL (each side pooled)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    configure_process()
    model_path = str(ensure_demo_model())
    rows = prompts(PROMPTS_PER_STEP * args.steps)
    dtype = default_dtype(torch.device("cpu"))
    peak = matmul_peak_tflops(dtype)
    # Rounds alternate the sides, so that the machine's drift (TRL's step moved between 17 and
    # 20 s from run to run) falls on both; each side's timed steps are pooled over the rounds.
    runs = {run_trinity: [], run_trl: []}
    for _ in range(args.rounds):
        for side, results in runs.items():
            results.append(in_fresh_process(side, model_path, rows, args.steps))
    (trinity_s, trinity_len), (trl_s, trl_len) = (
        (
            statistics.mean(t for times, _ in results for t in times[1:]),
            statistics.mean(n for _, lengths in results for n in lengths[1:]),
        )
        for results in runs.values()
    )
    by_round = ", ".join(
        f"{statistics.mean(trl_run[0][1:]) / statistics.mean(trinity_run[0][1:]):.1f}x"
        for trinity_run, trl_run in zip(runs[run_trinity], runs[run_trl], strict=True)
    )
    peak = max(peak, matmul_peak_tflops(dtype))
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    n_params = sum(p.numel() for p in model.parameters())
    prompt = prompt_tokens(model_path, rows)
    ours = step_tflop(n_params, prompt, trinity_len, shared_prompt=True)
    theirs = step_tflop(n_params, prompt, trl_len, shared_prompt=False)
    speedup = trl_s / trinity_s
    # Each side stops at EOS, so their completions differ in length from run to run (Trinity's
    # mean moved between 41 and 50 tokens with its numerics, TRL's stayed at 52): Trinity's step
    # scaled to TRL's mean completion by the tokens of its training pass (each prompt once, then
    # every completion), which grow faster than its sampling's decode steps do.
    rows_per_step = PROMPTS_PER_STEP * SAMPLES_PER_PROMPT
    at_their_length = trinity_s * (
        (PROMPTS_PER_STEP * prompt + rows_per_step * trl_len)
        / (PROMPTS_PER_STEP * prompt + rows_per_step * trinity_len)
    )
    target = 5 if dtype == torch.bfloat16 else 3
    lines = [
        f"- shapes: {PROMPTS_PER_STEP} prompts x {SAMPLES_PER_PROMPT} samples x <= {NEW_TOKENS} "
        f"new tokens (both stop at EOS), LoRA rank {RANK}, demo model, {dtype}, "
        f"{args.steps - 1} timed steps each in each of {args.rounds} rounds (the sides "
        f"alternating, each in a fresh process); {torch.get_num_threads()} threads, load "
        f"average {os.getloadavg()[0]:.1f} at the end",
        f"- speedup by round: {by_round}",
        f"- Trinity (local backend): {trinity_s:.2f} s/step (mean completion {trinity_len:.1f} "
        "tokens)",
        f"- TRL GRPOTrainer: {trl_s:.2f} s/step (mean completion {trl_len:.1f} tokens)",
        f"- speedup: **{speedup:.1f}x** (target >= {target}x where the engine computes in "
        f"{str(dtype).removeprefix('torch.')}): {'met' if speedup >= target else 'NOT met'}",
        f"- at TRL's completion length: Trinity's step scaled by the tokens of its training pass "
        f"({PROMPTS_PER_STEP} x prompt + {rows_per_step} x completion) from {trinity_len:.1f} to "
        f"{trl_len:.1f} tokens per completion: {at_their_length:.2f} s/step, "
        f"{trl_s / at_their_length:.1f}x",
        f"- roofline: {str(dtype).removeprefix('torch.')} matmul peak {peak:.3f} TFLOP/s "
        f"(measured in this run, best of trials); work per step (6 N per token: 2 N forward in "
        f"sampling, 4 N LoRA forward/backward; N = {n_params / 1e6:.0f} M, prompt "
        f"{prompt:.0f} tokens): Trinity {ours:.2f} TFLOP (a prompt once per group), "
        f"{ours / peak:.2f} s at peak, {100 * ours / peak / trinity_s:.0f} % of peak achieved; "
        f"TRL {theirs:.2f} TFLOP, {theirs / peak:.2f} s at peak, "
        f"{100 * theirs / peak / trl_s:.0f} % of peak achieved",
        f"- {target}x TRL is {trl_s / target:.2f} s/step: "
        f"{100 * ours / peak / (trl_s / target):.0f} % of peak on Trinity's work",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section("GRPO step vs TRL", lines, ROOT / "docs" / "benchmarks.md")


if __name__ == "__main__":
    main()
