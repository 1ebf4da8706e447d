"""Monitors backed by optional packages: TensorBoard, Weights & Biases, MLflow.

Each imports its package only when built, so ``trinity`` runs without them; a missing one fails
with a single line naming the package. All three default to files under ``<job_dir>/monitor/`` so
they work on a machine with no network: wandb falls back to offline mode (sync later with
``wandb sync``), MLflow defaults to a local SQLite store (its plain-file store is refused by
MLflow 3 unless ``MLFLOW_ALLOW_FILE_STORE`` is set).
"""

from __future__ import annotations

import logging
import netrc
import os
import re
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from trinity.monitor.base import RunInfo, require, scalar_metrics
from trinity.registry import MONITORS

log = logging.getLogger(__name__)


@MONITORS.register("tensorboard")
class TensorboardMonitor:
    def __init__(self, log_dir: str | Path):
        require("tensorboard", "tensorboard", "monitor 'tensorboard'")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    @classmethod
    def from_run(cls, run: RunInfo) -> TensorboardMonitor:
        return cls(run.monitor_dir / "tensorboard")

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for key, value in scalar_metrics(metrics).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # the default flushes every 2 min; a killed run would lose them

    def close(self) -> None:
        self.writer.close()


def _wandb_has_key(base_url: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(urlparse(base_url).hostname or "") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _reachable(url: str, timeout: float = 2.0) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode(monitor_args: Mapping[str, Any]) -> str:
    """``online`` only with an API key and a reachable server; WANDB_MODE / mode= win if set."""
    explicit = monitor_args.get("mode") or os.environ.get("WANDB_MODE")
    if explicit:
        return str(explicit)
    base_url = (
        monitor_args.get("base_url") or os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    )
    if not (monitor_args.get("api_key") or _wandb_has_key(base_url)):
        log.info("wandb: no API key, logging offline (upload later with `wandb sync`)")
        return "offline"
    if not _reachable(base_url):
        log.warning("wandb: %s is unreachable, logging offline", base_url)
        return "offline"
    return "online"


@MONITORS.register("wandb")
class WandbMonitor:
    def __init__(
        self,
        directory: str | Path,
        *,
        project: str,
        group: str = "",
        name: str = "",
        monitor_args: Mapping[str, Any] | None = None,
        run_config: Mapping[str, Any] | None = None,
    ):
        wandb = require("wandb", "wandb", "monitor 'wandb'")
        args = dict(monitor_args or {})
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.mode = wandb_mode(args)
        settings: dict[str, Any] = {"console": "off", "silent": True}
        if args.get("api_key"):
            settings["api_key"] = args["api_key"]
        if args.get("base_url"):
            settings["base_url"] = args["base_url"]
        self.run = wandb.init(
            project=project,
            group=group or None,
            name=name or None,
            dir=str(self.directory),
            mode=self.mode,
            config=dict(run_config) if run_config else None,
            reinit="create_new",
            settings=wandb.Settings(**settings),
        )
        # explorer and trainer log the same steps out of order; wandb drops a step lower than
        # its internal one, so plot against our own "step" metric instead
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    @classmethod
    def from_run(cls, run: RunInfo) -> WandbMonitor:
        return cls(
            run.monitor_dir,
            project=run.project,
            group=run.group,
            name=run.name,
            monitor_args=run.monitor_args,
        )

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self.run.log({**scalar_metrics(metrics), "step": step})

    def close(self) -> None:
        self.run.finish()


_MLFLOW_BAD = re.compile(r"[^/\w.\- :]")


def mlflow_key(key: str) -> str:
    """MLflow refuses '@' and other symbols in metric names (``eval/x/mean@4``)."""
    return _MLFLOW_BAD.sub("_", key.replace("@", "_at_"))


@MONITORS.register("mlflow")
class MlflowMonitor:
    BATCH = 1000  # MLflow's limit of metrics per log_batch call

    def __init__(
        self,
        directory: str | Path,
        *,
        project: str,
        group: str = "",
        name: str = "",
        monitor_args: Mapping[str, Any] | None = None,
    ):
        require("mlflow", "mlflow", "monitor 'mlflow'")
        from mlflow.tracking import MlflowClient

        args = dict(monitor_args or {})
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if args.get("username"):
            os.environ["MLFLOW_TRACKING_USERNAME"] = str(args["username"])
        if args.get("password"):
            os.environ["MLFLOW_TRACKING_PASSWORD"] = str(args["password"])
        self.uri = str(args.get("uri") or f"sqlite:///{(self.directory / 'mlflow.db').resolve()}")
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(project)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = self._create_experiment(project, local_artifacts=not args.get("uri"))
        tags = {"group": group} if group else {}
        self.run_id = self.client.create_run(
            experiment_id, run_name=name or None, tags=tags
        ).info.run_id

    def _create_experiment(self, project: str, *, local_artifacts: bool) -> str:
        from mlflow.exceptions import MlflowException

        artifacts = (self.directory / "mlruns").resolve().as_uri() if local_artifacts else None
        try:
            return self.client.create_experiment(project, artifact_location=artifacts)
        except MlflowException:  # the other process of a split run created it first
            experiment = self.client.get_experiment_by_name(project)
            if experiment is None:
                raise
            return experiment.experiment_id

    @classmethod
    def from_run(cls, run: RunInfo) -> MlflowMonitor:
        return cls(
            run.monitor_dir,
            project=run.project,
            group=run.group,
            name=run.name,
            monitor_args=run.monitor_args,
        )

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(mlflow_key(k), v, now, int(step)) for k, v in scalar_metrics(metrics).items()
        ]
        for i in range(0, len(batch), self.BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i : i + self.BATCH])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
