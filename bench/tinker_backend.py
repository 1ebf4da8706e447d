"""GRPO on the Tinker backend vs the local backend, and built-in loss vs the custom-loss path.

    python bench/tinker_backend.py [--steps 4]

Three runs of the same GRPO config on the demo model (4 prompts x 4 samples, 32 new tokens, LoRA
rank 32), side by side in one process:

1. local backend (engine in-process);
2. Tinker backend through an embedded ``trinity server`` (real HTTP, official SDK), GRPO mapped
   onto the built-in ``ppo`` loss: one ``forward_backward`` per step;
3. the same, but forced through ``forward_backward_custom`` as the original Trinity does (a
   forward pass, the loss on the client, then a weighted cross-entropy backward).

Reported: seconds per step (first step is warm-up), and the trainer's update time alone
(``time/update_actor``), where the two loss paths differ. Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.engine import write_section  # noqa: E402
from trinity.algorithms import build_loss_plan  # noqa: E402
from trinity.config import load_config  # noqa: E402
from trinity.engine import configure_process  # noqa: E402
from trinity.launcher import launcher  # noqa: E402
from trinity.monitor import read_metrics  # noqa: E402


def forced_custom_plan(*args, **kwargs):
    """The GRPO plan with the custom-loss path switched on, as the original always does."""
    plan = build_loss_plan(*args, **kwargs)
    plan.custom_reasons.append("forced by the benchmark")
    plan.loss_fn, plan.loss_fn_config = "cross_entropy", None
    return plan


def run(tmp: str, name: str, steps: int, tinker: bool) -> tuple[float, float]:
    overrides = [
        f"checkpoint_root_dir={tmp}",
        f"name={name}",
        f"buffer.total_steps={steps}",
        f"model.tinker.enable={str(tinker).lower()}",
        "model.tinker.base_url=local",
    ]
    config = load_config(ROOT / "bench" / "tinker_backend.yaml", overrides=overrides)
    launcher.run(config)
    records = read_metrics(Path(config.checkpoint_job_dir) / "monitor" / "metrics.jsonl")
    trained = [r for r in records if "time/update_actor" in r][1:]
    return (
        statistics.fmean(r["perf/time_per_step"] for r in trained),
        statistics.fmean(r["time/update_actor"] for r in trained),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per run, first is warm-up")
    args = parser.parse_args()
    configure_process()
    with tempfile.TemporaryDirectory() as tmp:
        local_step, local_update = run(tmp, "local", args.steps, tinker=False)
        tinker_step, tinker_update = run(tmp, "tinker", args.steps, tinker=True)
        launcher.build_loss_plan = forced_custom_plan
        custom_step, custom_update = run(tmp, "custom", args.steps, tinker=True)
    lines = [
        "Demo model, 4 prompts x 4 samples x <= 32 new tokens, LoRA rank 32, "
        f"{args.steps - 1} timed steps per run (after one warm-up step).",
        "",
        "| run | s/step | update s/step |",
        "|---|---:|---:|",
        f"| local backend | {local_step:.2f} | {local_update:.2f} |",
        f"| Tinker backend (embedded server), built-in ppo | {tinker_step:.2f} | "
        f"{tinker_update:.2f} |",
        f"| Tinker backend, custom-loss path | {custom_step:.2f} | {custom_update:.2f} |",
        "",
        f"- Tinker backend vs local, whole step: {tinker_step / local_step:.2f}x the time",
        f"- built-in mapping vs custom-loss path, update: **{custom_update / tinker_update:.2f}x** "
        "faster",
    ]
    print("\n".join(lines))
    write_section("Tinker backend", lines, ROOT / "docs" / "benchmarks.md")


if __name__ == "__main__":
    main()
