"""Explore throughput against Ray runner count, with workflows that wait on a slow judge.

    pip install -e '.[ray]'
    python bench/ray_runners.py [--steps 3] [--judge-s 0.25] [--no-write]

The reward (bench/plugins/slow_judge.py) blocks for ``--judge-s`` per response, as a call to a
remote LLM judge does. In one process a blocking judge holds the event loop, so workflows are
judged one at a time whatever ``runner_per_model`` says; on Ray every runner is a process of its
own and the judges wait side by side, while their sample requests still meet in one rollout
model actor. Timed: ``Explorer.explore_step`` alone (no trainer) over the same batches, the
first step being warm-up; local backend, demo model (SmolLM2-135M-Instruct), a local Ray cluster
started here. The in-process engine gets one torch thread, as Ray gives the rollout model actor
(``num_cpus=1``), so the rows differ only in where workflows run. Results go to
docs/benchmarks.md under "Ray runners".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import write_section  # noqa: E402

from trinity.config import load_config  # noqa: E402
from trinity.engine import configure_process  # noqa: E402
from trinity.launcher.backends import build_backends  # noqa: E402
from trinity.launcher.cluster import connect  # noqa: E402
from trinity.launcher.launcher import _explorer, _reader  # noqa: E402
from trinity.plugins import load_plugins  # noqa: E402

ROWS = (  # label, on Ray, runner_per_model
    ("Ray, 1 runner", True, 1),
    ("Ray, 4 runners", True, 4),
    ("in-process, 4 runners", False, 4),
)


async def tasks_per_second(config, use_ray: bool, steps: int) -> float:
    cluster = connect(config, explore=True) if use_ray else None
    backends = await build_backends(
        config, explore=True, train=False, resume_ref=None, cluster=cluster
    )
    try:
        reader = _reader(config, config.buffer.explorer_input.tasksets[0])
        explorer = _explorer(config, backends.sampler, reader, None, None, None, backends.runners)
        seconds = []
        for step in range(1, steps + 2):
            tasks = reader.read_batch()
            started = time.perf_counter()
            experiences, _ = await explorer.explore_step(step, tasks)
            seconds.append(time.perf_counter() - started)
            assert len(experiences) == len(tasks) * config.algorithm.repeat_times
            print(f"  step {step}: {seconds[-1]:.2f} s", flush=True)
        return len(tasks) / statistics.mean(seconds[1:])
    finally:
        await backends.close()
        if cluster is not None:
            cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up)")
    parser.add_argument("--judge-s", type=float, default=1.0, help="judge seconds per response")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    import ray
    import torch

    torch.set_num_threads(1)
    configure_process()
    load_plugins([ROOT / "bench" / "plugins"])  # the runners load the same dir
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=200 * 2**20,
    )
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, use_ray, runners in ROWS:
            print(label, flush=True)
            config = load_config(
                ROOT / "bench" / "ray_runners.yaml",
                overrides=[
                    f"checkpoint_root_dir={tmp}/ckpt",
                    f"explorer.runner_per_model={runners}",
                    f"buffer.explorer_input.taskset.reward_fn_args.delay={args.judge_s}",
                ],
            )
            rates[label] = asyncio.run(tasks_per_second(config, use_ray, args.steps))
    ray.shutdown()
    batch, repeat = config.buffer.batch_size, config.algorithm.repeat_times
    judge_s = batch * repeat * args.judge_s  # judge seconds per step, one judge at a time
    lines = [
        f"Explore throughput with a blocking judge of {args.judge_s:g} s per response "
        f"(bench/ray_runners.py): demo model, {batch} tasks x {repeat} samples x "
        f"{config.model.max_response_tokens} new tokens per step, one rollout model (one torch "
        f"thread), mean of {args.steps} steps after a warm-up, {os.cpu_count()} CPU cores.",
        "",
        "| explorer | tasks/s | vs Ray, 1 runner | judge s/step (lower bound) |",
        "|---|---:|---:|---:|",
        *(
            f"| {label} | {rate:.2f} | {rate / rates['Ray, 1 runner']:.2f}x | "
            f"{judge_s / (runners if ray_mode else 1):.0f} |"
            for (label, ray_mode, runners), rate in zip(ROWS, rates.values(), strict=True)
        ),
        "",
        f"4 runners vs 1 on Ray: **{rates['Ray, 4 runners'] / rates['Ray, 1 runner']:.1f}x**. "
        "Each Ray runner waits on its own judge; in one process a blocking judge holds the event "
        "loop, so judges run one at a time and only sampling overlaps. What 4 runners leave is "
        "sampling in the single rollout model, which more runners do not speed up.",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section("Ray runners", lines, ROOT / "docs" / "benchmarks.md")


if __name__ == "__main__":
    main()
