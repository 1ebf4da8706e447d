"""Metrics out of a run: jsonl (always), console progress, and tensorboard / wandb / mlflow.

``build_monitors`` is what the launcher calls; explorer and trainer only see ``log`` / ``close``.
Plugins add monitor types with ``@MONITORS.register("name")`` on a class with ``from_run(run)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trinity.monitor.base import (
    CompositeMonitor,
    Monitor,
    RunInfo,
    scalar_metrics,
    stats,
)
from trinity.monitor.console import ConsoleMonitor
from trinity.monitor.external import MlflowMonitor, TensorboardMonitor, WandbMonitor
from trinity.monitor.jsonl import JsonlMonitor, read_metrics, scan_metrics
from trinity.monitor.plot import metric_series, plot_metrics
from trinity.registry import MONITORS

__all__ = [
    "MONITORS",
    "CompositeMonitor",
    "ConsoleMonitor",
    "JsonlMonitor",
    "MlflowMonitor",
    "Monitor",
    "RunInfo",
    "TensorboardMonitor",
    "WandbMonitor",
    "build_monitors",
    "metric_series",
    "plot_metrics",
    "read_metrics",
    "scalar_metrics",
    "scan_metrics",
    "stats",
]

_NONE = {"", "none", "null", "off"}
logger = logging.getLogger(__name__)


def _plain(args: Any) -> dict[str, Any]:
    if args is None:
        return {}
    if isinstance(args, Mapping):
        return dict(args)
    items = getattr(args, "items", None)  # an OmegaConf DictConfig
    return dict(items()) if callable(items) else {}


def build_monitors(
    monitor_type: str | list[str] | None,
    *,
    job_dir: str | Path,
    project: str = "Trinity-RFT",
    group: str = "",
    name: str = "rft",
    total_steps: int | None = None,
    monitor_args: Mapping[str, Any] | None = None,
    console: bool = True,
) -> CompositeMonitor:
    """jsonl (always) + each configured type + console (unless ``console=False``).

    ``monitor_type`` is the config's ``monitor.monitor_type``: one name, a list, or none/empty.
    A type whose package is missing is skipped with a warning naming the package: configs written
    for a machine with wandb still run here, with their metrics in metrics.jsonl.
    """
    names = (
        [monitor_type] if isinstance(monitor_type, str) or monitor_type is None else monitor_type
    )
    wanted = ["jsonl"]
    for raw in names:
        key = str(raw or "").strip().lower()
        if key not in _NONE and key not in wanted and key != "console":
            wanted.append(key)
    if console or "console" in names:
        wanted.append("console")  # last: its ETA clock starts after the slow wandb/mlflow setup
    run = RunInfo(
        job_dir=Path(job_dir),
        project=project,
        group=group,
        name=name,
        total_steps=total_steps,
        monitor_args=_plain(monitor_args),
    )
    factories = [MONITORS.get(key) for key in wanted]  # unknown names fail before any side effect
    built: list[Monitor] = []
    try:
        for factory in factories:
            try:
                built.append(factory.from_run(run))
            except ImportError as exc:
                logger.warning("%s; skipping it, metrics still go to metrics.jsonl", exc)
    except BaseException:
        CompositeMonitor(built).close()
        raise
    return CompositeMonitor(built)
