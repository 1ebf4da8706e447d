"""frozen_lake GRPO on the demo model through the Tinker path (embedded ``trinity server``).

    python bench/frozen_lake.py [--steps 20] [--out docs/frozen_lake.png]

Runs ``examples/frozen_lake_demo.yaml`` (``trinity run``), then plots its reward curve
(``trinity plot``) and prints, per step, the mean episode reward and how many episodes made at
least one valid move (a reply naming left / down / right / up): with a 135M model, format
failures are what keep the reward at zero. The analysis alone, of a finished or running job:
``python bench/frozen_lake.py --stats JOB_DIR``. Results go to docs/benchmarks.md, "frozen_lake GRPO".
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.seed_experiment import run_args  # noqa: E402
from trinity.workflows.envs import FrozenLake  # noqa: E402

CONFIG = ROOT / "examples/frozen_lake_demo.yaml"
REWARD = "critic/rewards/mean"
ASSISTANT, END = "<|im_start|>assistant\n", "<|im_end|>"  # the demo model's chat template


def episode_stats(rollouts_db: Path) -> dict[int, tuple[int, int, int, int]]:
    """Per step: (episodes, episodes with a valid move, moves, valid moves), read from the stored
    conversations (one per episode; its replies are the assistant turns, each judged by the
    environment's own ``FrozenLake.move``)."""
    stats: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    with sqlite3.connect(rollouts_db) as db:
        for step, response in db.execute("SELECT step, response FROM rollouts"):
            replies = [turn.split(END)[0] for turn in response.split(ASSISTANT)]
            valid = sum(FrozenLake.move(reply) is not None for reply in replies)
            row = stats[step]
            row[0] += 1
            row[1] += valid > 0
            row[2] += len(replies)
            row[3] += valid
    return {step: tuple(row) for step, row in sorted(stats.items())}


def report(job: Path, out: str, wall: float | None) -> None:
    """The reward curve of ``job`` drawn into ``out``; per step, the table of docs/benchmarks.md."""
    title = "frozen_lake GRPO, demo model, Tinker path (embedded server)"
    plot = ["trinity", "plot", str(job), "--metric", REWARD, "-o", out, "--title", title]
    subprocess.run(plot, check=True)

    from trinity.monitor import read_metrics

    records = read_metrics(job / "monitor/metrics.jsonl")
    rewards = {r["step"]: r[REWARD] for r in records if REWARD in r}
    stats = episode_stats(job / "monitor/rollouts.db")
    walltime = "" if wall is None else f"; wall {wall / 60:.1f} min"
    print(f"figure: {out}; run under {job}{walltime}")
    print("| step | reward | episodes with a valid move | valid moves |")
    print("|---:|---:|---:|---:|")
    for step, (episodes, valid_eps, moves, valid_moves) in stats.items():
        reward = rewards.get(step, float("nan"))
        print(f"| {step} | {reward:.3f} | {valid_eps}/{episodes} | {valid_moves}/{moves} |")
    totals = [sum(column) for column in zip(*stats.values(), strict=True)]
    print(
        f"all steps: {totals[1]}/{totals[0]} episodes with a valid move, "
        f"{totals[3]}/{totals[2]} valid moves"
    )
    print(json.dumps({"wall_s": wall, "rewards": rewards, "stats": stats}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stats", metavar="JOB_DIR", help="only report on this job's run")
    args, root, env = run_args(__doc__, "frozen_lake", parser)
    if args.stats:
        report(Path(args.stats), args.out, None)
        return
    env["RAY_TMPDIR"] = str(root / "ray")  # one process: never join a Ray cluster found running
    cmd = ["trinity", "run", "--config", str(CONFIG), f"buffer.total_steps={args.steps}"]
    started = time.time()
    with open(root / "run.log", "w") as log:
        if subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=log).returncode:
            sys.exit(f"the run failed; see {root / 'run.log'}")
    report(root / "trinity-demo/frozen-lake/grpo", args.out, time.time() - started)


if __name__ == "__main__":
    main()
