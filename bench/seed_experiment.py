"""The seed document's experiment reproduced: its Tinker config and its veRL (local backend)
config run with the same model, data, shapes and seed; their reward curves overlaid in one figure.

    python bench/seed_experiment.py [--steps 20] [--out docs/seed_experiment.png]

Both configs are the seed's files as they are (tests/configs/seed/), with the same overrides on
each: the demo model for Llama 3.2 3B (not on this machine), the arithmetic taskset in GSM8K's
form for GSM8K, and CPU-sized shapes (docs/benchmarks.md, "Seed Tinker config", says why each).
The Tinker run drives an embedded ``trinity server`` through the official SDK; the veRL config's
run trains on the in-process engine (its ``trainer_type: verl`` and vLLM keys are inert here).
The two runs go side by side, one torch thread each, so they share the machine evenly.
Results go to docs/benchmarks.md under "Seed experiment: Tinker vs local backend".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED_CONFIGS = {
    "tinker": ROOT / "tests/configs/seed/tinker-llama3.2-3b-gsm8k.yaml",
    "local (veRL config)": ROOT / "tests/configs/seed/verl-llama3.2-3b-lora-gsm8k.yaml",
}
REWARD = "critic/rewards/mean"


def overrides(steps: int) -> list[str]:
    return [
        "model.model_path=demo",
        "model.tinker.base_model=demo",
        "model.tinker.base_url=local",
        "buffer.explorer_input.taskset.path=examples/data/arithmetic.jsonl",
        "buffer.batch_size=6",
        f"buffer.total_steps={steps}",
        "model.max_response_tokens=32",
        "algorithm.optimizer.lr=2e-4",
    ]


def metric_curve(job_dir: Path, key: str = REWARD) -> dict[int, float]:
    """One metric of a run per step (metrics.jsonl)."""
    from trinity.monitor import read_metrics

    records = read_metrics(job_dir / "monitor/metrics.jsonl")
    return {record["step"]: record[key] for record in records if key in record}


def curve_table(curves: dict[str, dict[int, float]], walls: dict[str, float] | None = None) -> None:
    """Prints the curves as a markdown table (one row each), then their first-5 / last-5 means."""
    steps = sorted(set().union(*curves.values()))
    print("| step | " + " | ".join(map(str, steps)) + " |")
    print("|---|" + "---:|" * len(steps))
    for label, curve in curves.items():
        print(
            f"| {label} | " + " | ".join(f"{curve.get(s, float('nan')):.2f}" for s in steps) + " |"
        )
    for label, curve in curves.items():
        values = [curve[s] for s in steps if s in curve]
        first, last = values[:5], values[-5:]
        wall = f"wall {walls[label] / 60:.1f} min, " if walls else ""
        print(
            f"{label}: {wall}mean of the first 5 steps "
            f"{sum(first) / len(first):.3f}, last 5 {sum(last) / len(last):.3f}"
        )


def job_dir_of(root: Path, config: Path) -> Path:
    from omegaconf import OmegaConf

    raw = OmegaConf.load(config)
    return root / raw.project / raw.group / raw.name


def run_args(
    doc: str, name: str, parser: argparse.ArgumentParser | None = None
) -> tuple[argparse.Namespace, Path, dict[str, str]]:
    """A run script's ``--steps / --out / --root`` (added to ``parser``, which may hold its own
    options), its checkpoint root and the environment of the ``trinity`` commands it starts
    (this checkout, that root)."""
    parser = parser or argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / f"docs/{name}.png"))
    parser.add_argument("--root", default=None, help="checkpoint root (default: a temp dir)")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix=f"{name}-"))
    env = {**os.environ, "TRINITY_CHECKPOINT_ROOT_DIR": str(root), "PYTHONPATH": str(ROOT)}
    return args, root, env


def main() -> None:
    args, root, env = run_args(__doc__, "seed_experiment")
    env["OMP_NUM_THREADS"] = "1"
    started, procs = time.time(), {}
    for label, config in SEED_CONFIGS.items():
        log = open(root / f"{job_dir_of(root, config).name}.log", "w")
        cmd = ["trinity", "run", "--config", str(config), *overrides(args.steps)]
        procs[label] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log), log)
    walls = {}
    for label, (proc, log) in procs.items():
        if proc.wait() != 0:
            sys.exit(f"{label} run failed (exit {proc.returncode}); see {log.name}")
        walls[label] = time.time() - started
    dirs = {label: job_dir_of(root, config) for label, config in SEED_CONFIGS.items()}
    subprocess.run(
        [
            "trinity",
            "plot",
            *map(str, dirs.values()),
            "--metric",
            REWARD,
            "-o",
            args.out,
            "--title",
            "Seed configs: Tinker vs local backend (demo model, arithmetic)",
        ],
        check=True,
    )
    curves = {label: metric_curve(path) for label, path in dirs.items()}
    print(f"figure: {args.out}; runs under {root}")
    curve_table(curves, walls)
    print(json.dumps({"walls_s": walls, "curves": curves}))


if __name__ == "__main__":
    main()
