"""The monitor interface, what a monitor type is built from, and fan-out to several monitors.

A monitor receives flat ``{"name": number}`` dicts keyed by step, with the original's metric names
(``critic/rewards/mean``, ``actor/pg_loss``, ``rollout/...``), as its monitors do. Explorer and
trainer share one monitor and log the same step numbers independently, so a monitor must accept
steps out of order.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from trinity.jobdir import JobDir

log = logging.getLogger(__name__)


@runtime_checkable
class Monitor(Protocol):
    def log(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RunInfo:
    """What a registered monitor type is built from (the run's identity and its job dir)."""

    job_dir: Path
    project: str = "Trinity-RFT"
    group: str = ""
    name: str = "rft"
    total_steps: int | None = None
    monitor_args: dict[str, Any] = field(default_factory=dict)

    @property
    def monitor_dir(self) -> Path:
        return JobDir(self.job_dir).monitor_dir


def require(module: str, package: str, feature: str, extra: str | None = "monitors") -> Any:
    """Import an optional dependency, or fail with one line that names the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = f" (or pip install 'trinity[{extra}]')" if extra else ""
        raise ImportError(
            f"{feature} needs the '{package}' package: pip install {package}{hint}"
        ) from exc


def to_number(value: Any) -> float | int | None:
    """A plain Python number for ``value`` (numpy / torch scalars included), or None if not numeric."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            value = item()
        except (ValueError, RuntimeError):  # arrays / tensors with more than one element
            return None
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None
    return None


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of ``metrics`` as floats; others are dropped (they are jsonl-only)."""
    out = {}
    for key, value in metrics.items():
        number = to_number(value)
        if number is not None:
            out[key] = float(number)
    return out


def stats(prefix: str, values: Iterable[float]) -> dict[str, float]:
    """``{prefix}/mean``, ``/max``, ``/min`` as the original names them; ``{}`` for no values."""
    data = [float(v) for v in values]
    if not data:
        return {}
    return {
        f"{prefix}/mean": math.fsum(data) / len(data),
        f"{prefix}/max": max(data),
        f"{prefix}/min": min(data),
    }


class RoleMonitor:
    """One loop's view of the run's monitor: its records carry ``role`` (explorer, trainer), so
    that a resumed run can drop exactly the records of the steps it redoes
    (``jsonl.forget_steps_after``), in one process or in two that share the file."""

    def __init__(self, monitor: Monitor, role: str):
        self.monitor = monitor
        self.role = role

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self.monitor.log({**metrics, "role": self.role}, step)

    def close(self) -> None:
        """The run's monitor is closed by whoever built it."""


class CompositeMonitor:
    """Fans out to several monitors.

    A failing monitor (say wandb losing its network) must not stop a training run: its error is
    logged once and the other monitors keep going. Calls are serialized with a lock because
    explorer and trainer may log from different threads.
    """

    def __init__(self, monitors: Iterable[Monitor]):
        self.monitors = list(monitors)
        self._failed: set[int] = set()
        self._lock = threading.Lock()

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        with self._lock:
            for i, monitor in enumerate(self.monitors):
                try:
                    monitor.log(metrics, step)
                except Exception:
                    if i not in self._failed:
                        self._failed.add(i)
                        log.exception(
                            "monitor %s failed to log; continuing", type(monitor).__name__
                        )

    def close(self) -> None:
        with self._lock:
            for monitor in self.monitors:
                try:
                    monitor.close()
                except Exception:
                    log.exception("monitor %s failed to close", type(monitor).__name__)

    def __enter__(self) -> CompositeMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
