"""On-policy distillation of the demo model from a teacher made better on the arithmetic task.

    python bench/distill_run.py [--steps 30] [--teacher-steps 30] [--out docs/distill_run.png]

1. teacher: SFT of the demo model (LoRA) on the correct answers of the built-in arithmetic
   taskset, merged into a Hugging Face directory by ``trinity convert``;
2. ``mode: bench`` on held-out arithmetic tasks (another seed): the base model's and the
   teacher's accuracy, so the teacher is shown to be better;
3. ``algorithm_type: on_policy_distill``: the base demo model as the student, the teacher as
   ``explorer.auxiliary_models[0]``; reverse KL (student || teacher, per response token, over the
   student's samples) and the student's reward per step.

All on the in-process engine. Results go to docs/benchmarks.md under "On-policy distillation".
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

import yaml
from seed_experiment import curve_table, metric_curve

ROOT = Path(__file__).resolve().parents[1]
KL, REWARD = "experience_pipeline/distill/reverse_kl", "critic/rewards/mean"
SYSTEM = "Answer with the number only."
FORMAT = {"prompt_key": "question", "response_key": "answer", "system_prompt": SYSTEM}
ARITHMETIC = {"num_terms": 2, "max_operand": 9}


def base_config(root: Path, group: str, steps: int) -> dict:
    return {
        "project": "distill-run",
        "group": group,
        "name": "demo",
        "checkpoint_root_dir": str(root),
        "model": {
            "model_path": "demo",
            "max_prompt_tokens": 128,
            "max_response_tokens": 16,
            "tinker": {"enable": False, "rank": 32},
        },
        "buffer": {
            "total_steps": steps,
            "explorer_input": {
                "default_workflow_type": "simple_workflow",
                "default_reward_fn_type": "accuracy_reward",
            },
        },
        "explorer": {"runner_per_model": 16, "rollout_model": {"engine_num": 1, "seed": 42}},
        "trainer": {"save_interval": steps, "grad_clip": 1.0},
        "monitor": {"monitor_type": "none"},
    }


def teacher_config(root: Path, steps: int, data: Path, eval_size: int) -> dict:
    """SFT on correct answers; its bench (mode=bench) scores the base model and the teacher."""
    config = base_config(root, "teacher", steps)
    config["mode"] = "train"
    config["algorithm"] = {"algorithm_type": "sft", "optimizer": {"lr": 1e-3}}
    config["buffer"].update(batch_size=16, train_batch_size=16)
    config["buffer"]["trainer_input"] = {
        "experience_buffer": {
            "name": "sft",
            "storage_type": "file",
            "path": str(data),
            "format": FORMAT,
        }
    }
    config["buffer"]["explorer_input"]["eval_tasksets"] = [
        {
            "name": "held_out",
            "storage_type": "file",
            "path": "builtin:arithmetic",
            "builtin_args": {**ARITHMETIC, "size": eval_size, "seed": 1},
            "format": FORMAT,
            "repeat_times": 4,
        }
    ]
    config["explorer"]["bench_on_latest_checkpoint"] = True
    return config


def distill_config(root: Path, steps: int, teacher: Path) -> dict:
    config = base_config(root, "distill", steps)
    config["mode"] = "both"
    config["algorithm"] = {
        "algorithm_type": "on_policy_distill",
        "repeat_times": 4,
        "optimizer": {"lr": 2e-4},
    }
    config["buffer"]["batch_size"] = 8
    inputs = config["buffer"]["explorer_input"]
    inputs["default_workflow_type"] = "on_policy_distill_workflow"
    inputs["taskset"] = {
        "name": "arithmetic",
        "storage_type": "file",
        "path": "builtin:arithmetic",
        "builtin_args": ARITHMETIC,
        "format": FORMAT,
    }
    config["explorer"]["auxiliary_models"] = [{"model_path": str(teacher)}]
    config["synchronizer"] = {"sync_method": "memory", "sync_interval": 1, "sync_offset": 0}
    return config


def job_dir(config: dict) -> Path:
    return Path(config["checkpoint_root_dir"], config["project"], config["group"], config["name"])


def trinity(root: Path, log_name: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(root / log_name, "w") as log:
        proc = subprocess.run(["trinity", *args], cwd=ROOT, env=env, stdout=log, stderr=log)
    if proc.returncode:
        sys.exit(f"trinity {args[0]} failed (exit {proc.returncode}); see {root / log_name}")


def run_config(root: Path, name: str, config: dict, *overrides: str) -> float:
    """Runs ``trinity run`` on the config (written as ``<name>.yaml``); returns its wall time."""
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.time()
    trinity(root, f"{name}.log", "run", "--config", str(path), *overrides)
    return time.time() - started


def bench_accuracy(job: Path) -> dict[int, float]:
    """Held-out accuracy (mean over tasks of the mean of 4 samples) per evaluated step."""
    from trinity.monitor import read_metrics

    key = "bench/held_out/accuracy/mean@4"
    return {r["step"]: r[key] for r in read_metrics(job / "monitor/metrics.jsonl") if key in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="distillation steps")
    parser.add_argument("--teacher-steps", type=int, default=30, help="SFT steps of the teacher")
    parser.add_argument("--eval-size", type=int, default=48, help="held-out tasks (x4 samples)")
    parser.add_argument("--out", default=str(ROOT / "docs/distill_run.png"))
    parser.add_argument("--root", default=None, help="checkpoint root (default: a temp dir)")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="distill-run-"))
    root.mkdir(parents=True, exist_ok=True)
    from trinity.buffer.procedural import build_builtin

    data = root / "sft.jsonl"
    rows = build_builtin("arithmetic", {**ARITHMETIC, "size": 16 * args.teacher_steps})
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    teacher_cfg = teacher_config(root, args.teacher_steps, data, args.eval_size)
    walls = {"teacher SFT": run_config(root, "teacher", teacher_cfg)}
    walls["bench"] = run_config(root, "bench", teacher_cfg, "mode=bench")
    teacher = root / "teacher"
    trinity(root, "convert.log", "convert", "--checkpoint", str(job_dir(teacher_cfg)), "--to", "hf",
            "--output", str(teacher))  # fmt: skip
    accuracy = bench_accuracy(job_dir(teacher_cfg))

    student_cfg = distill_config(root, args.steps, teacher)
    walls["distillation"] = run_config(root, "distill", student_cfg)
    student = job_dir(student_cfg)
    trinity(root, "plot.log", "plot", str(student), "--metric", KL, "--metric", REWARD, "-o",
            args.out, "--title", "On-policy distillation of the demo model (arithmetic)")  # fmt: skip

    base, tuned = accuracy[0], accuracy[max(accuracy)]
    print(f"figure: {args.out}; runs under {root}")
    print(
        f"held-out accuracy (mean@4, {args.eval_size} tasks): base {base:.3f}, teacher {tuned:.3f}"
    )
    curves = {
        "reverse KL": metric_curve(student, KL),
        "student reward": metric_curve(student, REWARD),
    }
    curve_table(curves)
    print(", ".join(f"{name} wall {wall / 60:.1f} min" for name, wall in walls.items()))
    print(json.dumps({"walls_s": walls, "accuracy": accuracy, "curves": curves}))


if __name__ == "__main__":
    main()
