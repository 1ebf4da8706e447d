"""Explore and train as two processes with ``sync_offset: 1``: does a step cost the longer of the
two, not their sum?

    python bench/two_process.py [--steps 5] [--oversubscribed]

GRPO on the local engine (bench/two_process.yaml: demo model, 2 prompts x 4 samples x <= 16 new
tokens by default, LoRA rank 16, weights handed over through the run directory). Each run is a
real ``trinity run`` process (or two), each process with its thread budget and CPU block
(trinity.engine.process: ``mode: explore`` / ``mode: train`` each take half the cores, pinned
to disjoint blocks of them, as they do beside each other):

1. explore alone (``mode: explore``, on its block) sampling with run 2's trained LoRA weights
   (from its second step on; the first, on the base model, is the warm-up): step time =
   ``explorer/time/explore_step``;
2. train alone (``mode: train`` on its block, on experiences an untimed explore run left in the
   buffer, publishing weights every step): step time = the trainer's ``perf/time_per_step``;
3. both at once, ``sync_interval: 1``, ``sync_offset: 1``, pinned: step time = the trainer's
   ``perf/time_per_step`` (a step's wait for experiences included);
4. the same with ``TRINITY_CPU_AFFINITY=off`` (same thread budget, not pinned).

Medians after the first step (warm-up). Target: run 3 <= 1.1 x max(run 1, run 2). For runs 3
and 4 the breakdown of a step from the metrics' timestamps: what the trainer waits for
(experiences; of that, the time from the explorer's write to the trainer's read, i.e. SQLite
polling), what the explorer waits for (weights; of that, loading them), and publishing.
``--oversubscribed`` adds the pair with every process on all cores (``TRINITY_NUM_THREADS``),
what the budget prevents. Results go to docs/benchmarks.md under "Speed: explore + train in two
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
from trinity.engine.process import (  # noqa: E402
    AFFINITY_VAR,
    ENV_VAR,
    core_groups,
    cpu_share,
    thread_budget,
    usable_cores,
)
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


def start(tmp: Path, name: str, mode: str, steps: int, env_set: dict[str, str], *extra: str):
    """``trinity run`` in its own process; ``env_set`` overrides the budget's variables."""
    cmd = [sys.executable, "-m", "trinity.cli.main", "run", "--config", str(CONFIG)]
    cmd += [f"checkpoint_root_dir={tmp}", f"name={name}", f"mode={mode}"]
    cmd += ["continue_from_checkpoint=true"]  # the runs of a pair (or 1 then 2) share a job dir
    cmd += [f"buffer.total_steps={steps}", *SHAPES, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRINITY_LOG_LEVEL": "WARNING"}
    for var in (ENV_VAR, AFFINITY_VAR):
        env.pop(var, None)
    env.update(env_set)
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)


def finish(*processes: subprocess.Popen) -> None:
    for process in processes:
        _, err = process.communicate(timeout=3600)
        if process.returncode:
            raise RuntimeError(f"trinity run failed ({process.returncode}): {err[-2000:]}")


def records(tmp: Path, name: str, key: str) -> dict[int, dict]:
    """The metrics records of run ``name`` holding ``key``, by step."""
    path = tmp / "bench" / "two-process" / name / "monitor" / "metrics.jsonl"
    return {r["step"]: r for r in read_metrics(path) if key in r}


def metric(tmp: Path, name: str, key: str) -> list[float]:
    by_step = records(tmp, name, key)
    return [by_step[step][key] for step in sorted(by_step)]


def median_after_warmup(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


def pair(tmp: Path, name: str, steps: int, env_set: dict[str, str]) -> list[float]:
    sync = ["synchronizer.sync_interval=1", "synchronizer.sync_offset=1"]
    explore = start(tmp, name, "explore", steps, env_set, *sync)
    train = start(tmp, name, "train", steps, env_set, *sync)
    finish(explore, train)
    return metric(tmp, name, "perf/time_per_step")


WAITED = 0.01  # s: a wait shorter than this is no wait


def breakdown(tmp: Path, name: str) -> dict[str, float]:
    """Medians over the steps after the first of where a pair's step goes, from the metrics.

    The explorer logs a step right after writing its experiences, the trainer logs a step after
    publishing its weights; ``time`` is the wall clock of each record. Handoff = the trainer's
    read returning minus the explorer's write of that step (SQLite polling and reading);
    pickup = the explorer's wait for weights ending (before loading them) minus the trainer's
    publication of that version (the synchronizer's polling). Each only over the steps where
    that side did wait (otherwise it is the time the data lay ready).
    """
    trainer = records(tmp, name, "perf/time_per_step")
    explorer = records(tmp, name, "explorer/time/explore_step")
    syncs = records(tmp, name, "explorer/time/wait_sync")
    rows: dict[str, list[float]] = {}

    def add(label: str, value: float) -> None:
        rows.setdefault(label, []).append(value)

    for step, record in sorted(trainer.items())[1:]:
        add("trainer: wait for experiences", record["time/read_experience"])
        add("trainer: forward/backward + optim", record["time/update_actor"])
        add("trainer: publish weights", record.get("time/sync_weight", 0.0))
        add("trainer: CPU s per step (its threads)", record["perf/cpu_time_per_step"])
        started = record["time"] - record["perf/time_per_step"]
        if step in explorer and record["time/read_experience"] > WAITED:
            add(
                "handoff: explorer's write -> trainer's read",
                started + record["time/read_experience"] - explorer[step]["time"],
            )
    for _step, record in sorted(explorer.items())[1:]:
        add("explorer: explore step", record["explorer/time/explore_step"])
        add(
            "explorer: CPU s per explore step (its threads)",
            record["explorer/time/explore_step_cpu"],
        )
    for step, record in sorted(syncs.items())[1:]:
        load = record.get("explorer/time/load_weights", 0.0)
        add("explorer: wait for weights (load included)", record["explorer/time/wait_sync"])
        add("explorer: load weights", load)
        published = trainer.get(step - 2)  # explore step s samples with the weights of step s - 2
        if published is not None and record["explorer/time/wait_sync"] - load > WAITED:
            add(
                "pickup: trainer's publish -> explorer's load",
                record["time"] - load - published["time"],
            )
    return {label: statistics.median(values) for label, values in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="steps per run, first is warm-up")
    parser.add_argument("--oversubscribed", action="store_true")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step (x 4 samples)")
    parser.add_argument("--new-tokens", type=int, default=16, help="max new tokens per sample")
    parser.add_argument("--rounds", type=int, default=1, help="pinned / unpinned pairs")
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
    groups = core_groups()
    blocks = [cpu_share(2, slot, groups) for slot in (0, 1)]
    pinned: dict[str, str] = {}
    unpinned = {AFFINITY_VAR: "off"}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # experiences for run 2 (sampled from the base model: not timed)
        no_sync = "synchronizer.sync_interval=100000"
        finish(start(tmp, "alone", "explore", args.steps, pinned, no_sync))
        # 2. train alone, on what that left in the buffer
        finish(start(tmp, "alone", "train", args.steps, pinned))
        train = metric(tmp, "alone", "perf/time_per_step")
        # 1. explore alone with the trained LoRA weights, as in the pair (an adapter costs
        # decoding time): a copy of run 2's published weights, no checkpoint to resume from
        jobs = tmp / "bench" / "two-process"
        skip = ("global_step_*", "latest_checkpointed_*", "monitor", "buffer")
        shutil.copytree(jobs / "alone", jobs / "lora", ignore=shutil.ignore_patterns(*skip))
        sync = "synchronizer.sync_offset=0"
        finish(start(tmp, "lora", "explore", args.steps, pinned, sync))
        explore = metric(tmp, "lora", "explorer/time/explore_step")
        # 3. and 4. both at once, pinned and not (alternating, so both see the same load)
        both: list[float] = []
        loose: list[float] = []
        trainer_alone = breakdown(tmp, "alone")  # its explorer part is the untimed run's
        explorer_alone = breakdown(tmp, "lora")
        parts: dict[str, list[dict[str, float]]] = {
            "alone": [
                {k: v for k, v in trainer_alone.items() if k.startswith("trainer")}
                | {k: v for k, v in explorer_alone.items() if k.startswith("explorer")}
            ],
            "pinned": [],
            "unpinned": [],
        }
        for round_ in range(args.rounds):
            both += pair(tmp, f"pinned{round_}", args.steps, pinned)
            parts["pinned"].append(breakdown(tmp, f"pinned{round_}"))
            loose += pair(tmp, f"unpinned{round_}", args.steps, unpinned)
            parts["unpinned"].append(breakdown(tmp, f"unpinned{round_}"))
        over = (
            pair(tmp, "oversubscribed", args.steps, {ENV_VAR: str(usable_cores())})
            if args.oversubscribed
            else []
        )
    explore_s, train_s, both_s, loose_s = map(median_after_warmup, (explore, train, both, loose))
    bound = max(explore_s, train_s)
    ratio = both_s / bound

    def row(label: str, values: list[float]) -> str:
        steps = ", ".join(f"{v:.2f}" for v in values)
        return f"| {label} | {median_after_warmup(values):.2f} | {steps} |"

    def split_row(label: str) -> str:
        cells = [
            statistics.median(part[label] for part in parts[kind] if label in part)
            if any(label in part for part in parts[kind])
            else float("nan")
            for kind in ("alone", "pinned", "unpinned")
        ]
        return "| " + " | ".join([label, *(f"{c:.2f}" for c in cells)]) + " |"

    order = (parts["pinned"], parts["unpinned"], parts["alone"])
    labels = list(dict.fromkeys(label for kind in order for part in kind for label in part))
    lines = [
        *machine,
        f"- load average {load:.1f} at the start (other processes share these cores); "
        f"{time.monotonic() - started:.0f} s in all",
        "",
        f"GRPO, local engine, demo model, {args.prompts} prompts x 4 samples x <= "
        f"{args.new_tokens} new tokens, LoRA rank 16, "
        f"{args.steps} steps per run (median after the first). Thread budget: "
        f"{budget.threads} threads per process ({budget.why}); CPU blocks "
        f"(`TRINITY_CPU_AFFINITY` auto): explore {blocks[0]}, train {blocks[1]}.",
        "",
        "| run | s/step (median) | steps (s) |",
        "|---|---:|---|",
        row("explore alone (`mode: explore`, its block, LoRA weights)", explore),
        row("train alone (`mode: train`, its block, publishing every step)", train),
        row("explore + train, two processes, sync_offset 1, pinned", both),
        row("the same, not pinned (`TRINITY_CPU_AFFINITY=off`)", loose),
        *([row("the same, every process on all cores (oversubscribed)", over)] if over else []),
        "",
        f"- two processes / max(explore, train) = {both_s:.2f} / {bound:.2f} = **{ratio:.2f}x** "
        f"(target <= 1.1x): {'met' if ratio <= 1.1 else 'NOT met'}; not pinned "
        f"{loose_s / bound:.2f}x; the sum would be {(explore_s + train_s) / bound:.2f}x",
        "",
        "Where a step of the pair goes (seconds, medians after the first step; from the metrics' "
        "timestamps, see `breakdown` in bench/two_process.py):",
        "",
        "| part | alone | pair, pinned | pair, not pinned |",
        "|---|---:|---:|---:|",
        *(split_row(label) for label in labels),
    ]
    print("\n".join(lines[len(machine) :]))
    if not args.no_write:
        write_section(
            "Speed: explore + train in two processes", lines, ROOT / "docs" / "benchmarks.md"
        )


if __name__ == "__main__":
    main()
