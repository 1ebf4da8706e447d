"""Reward curves for docs and reports, drawn from a run's metrics.jsonl (needs matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from trinity.monitor.base import require
from trinity.monitor.jsonl import read_metrics


def metric_series(jsonl_path: str | Path, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; a step logged twice (a resumed run) keeps its last value."""
    by_step: dict[int, float] = {}
    for record in read_metrics(jsonl_path):
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            by_step[int(record["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_metrics(
    jsonl_path: str | Path,
    keys: Sequence[str] = ("critic/rewards/mean",),
    out_png: str | Path = "metrics.png",
    *,
    title: str | None = None,
) -> Path:
    """One panel per metric against step, saved as a PNG; returns its path."""
    require("matplotlib", "matplotlib", "plot_metrics", extra=None)
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    keys = list(keys)
    if not keys:
        raise ValueError("plot_metrics needs at least one metric key")
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.6 * len(keys)), squeeze=False)
    try:
        for ax, key in zip(axes[:, 0], keys, strict=True):
            steps, values = metric_series(jsonl_path, key)
            if not steps:
                raise ValueError(f"metric '{key}' not found in {jsonl_path}")
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, linewidth=1.5)
            ax.set_ylabel(key.split("/")[-2] if key.count("/") >= 1 else key, fontsize=9)
            ax.set_title(key, fontsize=9)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        out = Path(out_png)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
    return out
