"""Metric curves for reports and papers, drawn from runs' metrics.jsonl (needs matplotlib).

``trinity plot`` draws with ``plot_runs``; ``series`` and ``smooth`` are also what the studio's
charts are computed from, so a figure in a paper and the curve on screen agree.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from trinity.monitor.base import require
from trinity.monitor.jsonl import read_metrics


def series(records: Iterable[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; a step logged twice (a resumed run) keeps its last value."""
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            by_step[int(record["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def metric_series(jsonl_path: str | Path, key: str) -> tuple[list[int], list[float]]:
    return series(read_metrics(jsonl_path), key)


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential moving average; weight 0 leaves the values as they are."""
    out, last, norm = [], 0.0, 0.0
    for value in values:
        last = last * weight + (1 - weight) * value
        norm = norm * weight + (1 - weight)
        out.append(last / norm)
    return out


def run_labels(paths: Sequence[str | Path]) -> list[str]:
    """The shortest trailing parts of each path that tell the runs apart (``group/name``)."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(map(len, parts), default=1) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def metrics_figure(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    keys: Sequence[str],
    *,
    smoothing: float = 0.0,
    title: str | None = None,
) -> Any:
    """A matplotlib Figure: one panel per metric against step, one line per run (by label).

    A metric that no run logged is a ValueError naming the closest logged one; a run without it
    simply has no line in that panel.
    """
    require("matplotlib", "matplotlib", "plotting metrics", extra=None)
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    keys = list(keys)
    if not keys:
        raise ValueError("at least one metric is needed")
    logged = sorted({key for records in runs.values() for r in records for key in r})
    for key in keys:
        if key not in logged:
            close = difflib.get_close_matches(key, logged, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"metric '{key}' was logged by none of the runs{hint}")
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.8 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        for label, records in runs.items():
            steps, values = series(records, key)
            if steps:
                ax.plot(
                    steps,
                    smooth(values, smoothing),
                    label=label,
                    linewidth=1.5,
                    marker="o" if len(steps) == 1 else None,  # a lone point shows too
                    markersize=3,
                )
        ax.set_xlabel("step")
        ax.set_ylabel(key, fontsize=9)
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_runs(
    runs: Mapping[str, str | Path],
    keys: Sequence[str],
    out_png: str | Path,
    *,
    smoothing: float = 0.0,
    title: str | None = None,
) -> Path:
    """``runs`` (label -> metrics.jsonl) drawn by ``metrics_figure`` and saved; returns the path."""
    records = {label: read_metrics(path) for label, path in runs.items()}
    fig = metrics_figure(records, keys, smoothing=smoothing, title=title)
    import matplotlib.pyplot as plt  # there: metrics_figure needed it

    try:
        out = Path(out_png)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
    return out


def plot_metrics(
    jsonl_path: str | Path,
    keys: Sequence[str] = ("critic/rewards/mean",),
    out_png: str | Path = "metrics.png",
    *,
    title: str | None = None,
) -> Path:
    """One run's metrics, one panel each, saved as a PNG; returns its path."""
    return plot_runs({"run": jsonl_path}, keys, out_png, title=title)
