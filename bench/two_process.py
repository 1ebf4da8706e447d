"""Explore and train as two processes with ``sync_offset: 1``: does a step cost the longer of the
two, not their sum?

    python bench/two_process.py [--steps 5] [--oversubscribed]

GRPO on the local engine (bench/two_process.yaml: demo model, 2 prompts x 4 samples x <= 16 new
tokens by default, LoRA rank 16, weights handed over through the run directory). Three runs, each a real
``trinity run`` process (or two), each process with its thread budget (trinity.engine.process:
``mode: explore`` / ``mode: train`` each take half the cores, as they do beside each other):

1. explore alone (``mode: explore``) sampling with run 2's trained LoRA weights (from its second
   step on; the first, on the base model, is the warm-up): step time =
   ``explorer/time/explore_step``;
2. train alone (``mode: train`` on experiences an untimed explore run left in the buffer,
   publishing weights every step): step time = the trainer's ``perf/time_per_step``;
3. both at once, ``sync_interval: 1``, ``sync_offset: 1``: step time = the trainer's
   ``perf/time_per_step`` (a step's wait for experiences included).

Medians after the first step (warm-up). Target: run 3 <= 1.1 x max(run 1, run 2).
``--oversubscribed`` adds run 3 with every process on all cores (``TRINITY_NUM_THREADS``), what
the budget prevents. Results go to docs/benchmarks.md under "Speed: explore + train in two
processes".
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.engine import machine_section, write_section  # noqa: E402
from trinity.engine import configure_process  # noqa: E402
from trinity.engine.process import ENV_VAR, thread_budget, usable_cores  # noqa: E402
from trinity.monitor import read_metrics  # noqa: E402

CONFIG = ROOT / "bench" / "two_process.yaml"
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_kind() -> str:
    """``lscpu``'s model name, the vector / matrix flags that set the engine's dtype, and cores."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if "model name" in ln), "?"
    )
    words = set(text.split())
    flags = " ".join(f for f in FLAGS if f in words) or "none of " + ", ".join(FLAGS)
    return f"- CPU: {model}, {os.cpu_count()} cores, flags: {flags}"


SHAPES: list[str] = []  # overrides from the command line (prompts, new tokens)


def start(tmp: Path, name: str, mode: str, steps: int, threads: int | None, *extra: str):
    cmd = [sys.executable, "-m", "trinity.cli.main", "run", "--config", str(CONFIG)]
    cmd += [f"checkpoint_root_dir={tmp}", f"name={name}", f"mode={mode}"]
    cmd += ["continue_from_checkpoint=true"]  # the runs of a pair (or 1 then 2) share a job dir
    cmd += [f"buffer.total_steps={steps}", *SHAPES, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRINITY_LOG_LEVEL": "WARNING"}
    env.pop(ENV_VAR, None)
    if threads:
        env[ENV_VAR] = str(threads)
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)


def finish(*processes: subprocess.Popen) -> None:
    for process in processes:
        _, err = process.communicate(timeout=3600)
        if process.returncode:
            raise RuntimeError(f"trinity run failed ({process.returncode}): {err[-2000:]}")


def metric(tmp: Path, name: str, key: str) -> list[float]:
    records = read_metrics(tmp / "bench" / "two-process" / name / "monitor" / "metrics.jsonl")
    by_step = {r["step"]: r[key] for r in records if key in r}
    return [by_step[step] for step in sorted(by_step)]


def median_after_warmup(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


def pair(tmp: Path, name: str, steps: int, threads: int | None) -> list[float]:
    sync = ["synchronizer.sync_interval=1", "synchronizer.sync_offset=1"]
    explore = start(tmp, name, "explore", steps, threads, *sync)
    train = start(tmp, name, "train", steps, threads, *sync)
    finish(explore, train)
    return metric(tmp, name, "perf/time_per_step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="steps per run, first is warm-up")
    parser.add_argument("--oversubscribed", action="store_true")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step (x 4 samples)")
    parser.add_argument("--new-tokens", type=int, default=16, help="max new tokens per sample")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    SHAPES[:] = [
        f"buffer.batch_size={args.prompts}",
        f"model.max_response_tokens={args.new_tokens}",
    ]
    configure_process()
    machine = [cpu_kind(), *machine_section({})]
    print("\n".join(machine), flush=True)
    load, started = os.getloadavg()[0], time.monotonic()
    budget = thread_budget(2)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # experiences for run 2 (sampled from the base model: not timed)
        no_sync = "synchronizer.sync_interval=100000"
        finish(start(tmp, "alone", "explore", args.steps, None, no_sync))
        # 2. train alone, on what that left in the buffer
        finish(start(tmp, "alone", "train", args.steps, None))
        train = metric(tmp, "alone", "perf/time_per_step")
        # 1. explore alone with the trained LoRA weights, as in the pair (an adapter costs
        # decoding time): a copy of run 2's published weights, no checkpoint to resume from
        jobs = tmp / "bench" / "two-process"
        skip = ("global_step_*", "latest_checkpointed_*", "monitor", "buffer")
        shutil.copytree(jobs / "alone", jobs / "lora", ignore=shutil.ignore_patterns(*skip))
        sync = "synchronizer.sync_offset=0"
        finish(start(tmp, "lora", "explore", args.steps, None, sync))
        explore = metric(tmp, "lora", "explorer/time/explore_step")
        # 3. both at once
        both = pair(tmp, "pair", args.steps, None)
        over = (
            pair(tmp, "oversubscribed", args.steps, usable_cores()) if args.oversubscribed else []
        )
    explore_s, train_s, both_s = map(median_after_warmup, (explore, train, both))
    bound = max(explore_s, train_s)
    ratio = both_s / bound

    def row(label: str, values: list[float]) -> str:
        steps = ", ".join(f"{v:.2f}" for v in values)
        return f"| {label} | {median_after_warmup(values):.2f} | {steps} |"

    lines = [
        *machine,
        f"- load average {load:.1f} at the start (other processes share these cores); "
        f"{time.monotonic() - started:.0f} s in all",
        "",
        f"GRPO, local engine, demo model, {args.prompts} prompts x 4 samples x <= "
        f"{args.new_tokens} new tokens, LoRA rank 16, "
        f"{args.steps} steps per run (median after the first). Thread budget: "
        f"{budget.threads} threads per process ({budget.why}).",
        "",
        "| run | s/step (median) | steps (s) |",
        "|---|---:|---|",
        row("explore alone (`mode: explore`, LoRA weights)", explore),
        row("train alone (`mode: train`, publishing every step)", train),
        row("explore + train, two processes, sync_offset 1", both),
        *([row("the same, every process on all cores (oversubscribed)", over)] if over else []),
        "",
        f"- two processes / max(explore, train) = {both_s:.2f} / {bound:.2f} = **{ratio:.2f}x** "
        f"(target <= 1.1x): {'met' if ratio <= 1.1 else 'NOT met'}; the sum would be "
        f"{(explore_s + train_s) / bound:.2f}x",
    ]
    print("\n".join(lines[len(machine) :]))
    if not args.no_write:
        write_section(
            "Speed: explore + train in two processes", lines, ROOT / "docs" / "benchmarks.md"
        )


if __name__ == "__main__":
    main()
