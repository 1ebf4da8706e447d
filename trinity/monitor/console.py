"""Human-facing progress: a rich live bar on a terminal, plain lines in CI logs.

On a terminal the bar shows step / total, the latest reward, the step time and an ETA, and each
``log`` call prints one compact line above it. When the stream is not a terminal (CI, a pipe, a
file) there is no bar and no escape codes: the same compact line is printed, ETA included.

Simplifications: the ETA is wall time per step since the monitor started (robust to slow first
steps less than a moving average, but needs no tuning); a ``log`` call that holds only timings
(e.g. ``explorer/time/wait_sync``) updates the bar but prints no line.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from trinity.monitor.base import RunInfo, scalar_metrics
from trinity.registry import MONITORS

REWARD_KEYS = (
    "critic/rewards/mean",
    "rollout/reward/mean",
    "rollout/accuracy/mean",
    "experience_pipeline/group_advantages/reward_mean/mean",
)
STEP_TIME_KEYS = ("perf/time_per_step", "time/step", "explorer/time/explore_step")
# (key, label) shown in the compact line, in this order, when present.
HEADLINE = (
    ("actor/loss", "loss"),
    ("actor/pg_loss", "pg_loss"),
    ("actor/kl_loss", "kl"),
    ("actor/entropy", "entropy"),
    ("actor/grad_norm", "grad_norm"),
    ("response_length/mean", "resp_len"),
)
_ROLLOUT_MEAN = re.compile(r"^rollout/(.+)/mean$")
_EVAL_MEAN = re.compile(r"^(eval|bench)/(.+)/mean@\d+$")


def fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _first(metrics: Mapping[str, float], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        if key in metrics:
            return metrics[key]
    return None


def role_of(metrics: Mapping[str, Any]) -> str:
    """Which loop a log call came from, guessed from its metric prefixes."""
    if any(k.startswith(("eval/", "bench/")) for k in metrics):
        return "eval"
    if any(k.startswith(("rollout/", "explorer/", "experience_pipeline/")) for k in metrics):
        return "explore"
    return "train"


def summary(metrics: Mapping[str, float]) -> list[str]:
    """The few ``label value`` pairs worth a human's glance, most important first."""
    parts = []
    reward = metrics.get("critic/rewards/mean")
    if reward is not None:
        parts.append(f"reward {fmt(reward)}")
    for key, value in metrics.items():
        match = _ROLLOUT_MEAN.match(key) or _EVAL_MEAN.match(key)
        if match and "time" not in key and len(parts) < 4:
            label = key.split("/", 1)[1] if key.startswith(("eval/", "bench/")) else match.group(1)
            parts.append(f"{label} {fmt(value)}")
    parts.extend(f"{label} {fmt(metrics[key])}" for key, label in HEADLINE if key in metrics)
    if not parts:
        parts = [
            f"{key} {fmt(value)}" for key, value in list(metrics.items())[:4] if "time" not in key
        ]
    step_time = _first(metrics, STEP_TIME_KEYS)
    if step_time is not None:
        parts.append(f"{step_time:.2f} s/step")
    return parts


@MONITORS.register("console")
class ConsoleMonitor:
    def __init__(
        self,
        total_steps: int | None = None,
        *,
        stream: IO[str] | None = None,
        force_terminal: bool | None = None,
        title: str = "trinity",
    ):
        from rich.console import Console

        self.total_steps = total_steps
        self.stream = stream if stream is not None else sys.stdout
        self.console = Console(file=self.stream, force_terminal=force_terminal)
        self.live = self.console.is_terminal
        self.started = time.monotonic()
        self.first_step: int | None = None
        self.step = 0
        self.reward: float | None = None
        self.step_time: float | None = None
        self._progress = None
        if self.live:
            self._start_bar(title)

    @classmethod
    def from_run(cls, run: RunInfo) -> ConsoleMonitor:
        return cls(run.total_steps, title=run.name or "trinity")

    def _start_bar(self, title: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("reward {task.fields[reward]}"),
            TextColumn("{task.fields[step_time]}"),
            TextColumn("eta {task.fields[eta]}"),
            console=self.console,
            transient=False,
        )
        self._task = self._progress.add_task(
            title, total=self.total_steps, reward="-", step_time="-", eta="-"
        )
        self._progress.start()

    def eta(self) -> float | None:
        if not self.total_steps or self.first_step is None:
            return None
        done = self.step - self.first_step + 1
        if done <= 0:
            return None
        per_step = (time.monotonic() - self.started) / done
        return per_step * max(self.total_steps - self.step, 0)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        values = scalar_metrics(metrics)
        if self.first_step is None:
            self.first_step = step
        self.step = max(self.step, step)
        reward = _first(values, REWARD_KEYS)
        if reward is not None:
            self.reward = reward
        step_time = _first(values, STEP_TIME_KEYS)
        if step_time is not None:
            self.step_time = step_time
        eta = self.eta()
        timing_only = all("time" in key for key in values)
        line = None
        if values and not timing_only:
            total = f"/{self.total_steps}" if self.total_steps else ""
            parts = [f"step {step}{total} [{role_of(values)}]", *summary(values)]
            if eta is not None:
                parts.append(f"eta {fmt_duration(eta)}")
            line = "  ".join(parts)
        if self._progress is None:
            if line is not None:
                print(line, file=self.stream, flush=True)
            return
        if line is not None:
            self._progress.console.print(line, markup=False, highlight=False)
        self._progress.update(
            self._task,
            completed=self.step,
            reward=fmt(self.reward) if self.reward is not None else "-",
            step_time=f"{self.step_time:.2f} s/step" if self.step_time is not None else "-",
            eta=fmt_duration(eta) if eta is not None else "-",
        )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
