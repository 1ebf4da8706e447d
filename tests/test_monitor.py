"""Monitors: jsonl, console (plain and live), tensorboard / wandb / mlflow files, plots."""

from __future__ import annotations

import io
import json
import logging
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from trinity.monitor import (
    MONITORS,
    CompositeMonitor,
    ConsoleMonitor,
    JsonlMonitor,
    build_monitors,
    metric_series,
    plot_metrics,
    read_metrics,
    scan_metrics,
    stats,
)
from trinity.monitor.external import mlflow_key, wandb_mode

TRAIN = {"critic/rewards/mean": 0.5, "actor/loss": -0.125, "perf/time_per_step": 1.5}


# --- jsonl -------------------------------------------------------------------------------------


def test_jsonl_records_and_types(tmp_path):
    mon = JsonlMonitor(tmp_path / "monitor" / "metrics.jsonl")
    mon.log({"a": 1.5, "np": np.float32(0.25), "t": torch.tensor(3), "nan": math.nan}, 1)
    mon.log({"note": "text", "flag": True}, 2)
    mon.close()
    lines = (tmp_path / "monitor" / "metrics.jsonl").read_text().splitlines()
    first, second = (json.loads(line) for line in lines)  # strict JSON: no NaN literal
    assert first["step"] == 1 and first["a"] == 1.5 and first["np"] == 0.25 and first["t"] == 3
    assert first["nan"] is None and isinstance(first["time"], float)
    assert second == {"step": 2, "time": second["time"], "note": "text", "flag": 1}
    with pytest.raises(RuntimeError, match="after close"):
        mon.log({"a": 1}, 3)


def test_jsonl_is_on_disk_per_line_even_when_killed(tmp_path):
    path = tmp_path / "metrics.jsonl"
    code = textwrap.dedent(
        f"""
        import os, signal
        from trinity.monitor import JsonlMonitor
        mon = JsonlMonitor({str(path)!r})
        for step in range(1, 4):
            mon.log({{"critic/rewards/mean": step / 10}}, step)
        os.kill(os.getpid(), signal.SIGKILL)  # no close(), no interpreter shutdown
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=30)
    assert proc.returncode == -9
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_jsonl_two_writers_and_torn_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    explorer, trainer = JsonlMonitor(path), JsonlMonitor(path)  # e.g. explore + train processes
    for step in range(1, 51):
        explorer.log({"rollout/x/mean": step, "pad": "x" * 500}, step)
        trainer.log(TRAIN, step)
        assert len(path.read_text().splitlines()) == 2 * step  # visible before close
    explorer.close()
    trainer.close()
    with open(path, "a") as f:
        f.write('{"step": 51, "critic/rew')  # a run killed mid-line
    records = read_metrics(path)
    assert len(records) == 100
    assert metric_series(path, "critic/rewards/mean") == (list(range(1, 51)), [0.5] * 50)
    with open(path, "a") as f:
        f.write('\n[1, 2]\n{"time": 3.0}\n{"step": 52, "x": 1}\n')  # not records: not kept
    records, skipped = scan_metrics(path)
    assert len(records) == 101 and records[-1]["step"] == 52
    assert skipped == [101, 102, 103]  # the torn line, a list, an object without a step


# --- console -----------------------------------------------------------------------------------


def test_console_plain_lines_when_not_a_tty():
    out = io.StringIO()
    mon = ConsoleMonitor(total_steps=4, stream=out)
    assert not mon.live
    mon.log({"explorer/time/wait_sync": 0.1}, 1)  # timings only: no line
    mon.log({"rollout/accuracy/mean": 0.25, "explorer/time/explore_step": 2.0}, 1)
    mon.log(TRAIN, 1)
    mon.log({**TRAIN, "critic/rewards/mean": 0.75}, 2)
    mon.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert "\x1b[" not in out.getvalue()  # no escape codes in CI logs
    assert lines[0].startswith("step 1/4 [explore]") and "accuracy 0.25" in lines[0]
    assert lines[1].startswith("step 1/4 [train]")
    assert "reward 0.5" in lines[1] and "loss -0.125" in lines[1] and "1.50 s/step" in lines[1]
    assert "reward 0.75" in lines[2] and "eta 0:00:0" in lines[2]


def test_console_live_bar_on_a_terminal():
    out = io.StringIO()
    mon = ConsoleMonitor(total_steps=5, stream=out, force_terminal=True, title="demo")
    assert mon.live
    mon.log(TRAIN, 2)
    mon.close()
    text = out.getvalue()
    assert "2/5" in text and "demo" in text and "reward 0.5" in text and "1.50 s/step" in text
    assert "step 2/5 [train]" in text


def test_console_eta_from_wall_time(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("trinity.monitor.console.time.monotonic", lambda: now[0])
    mon = ConsoleMonitor(total_steps=10, stream=io.StringIO())
    now[0] = 110.0
    mon.log(TRAIN, 1)
    assert mon.eta() == pytest.approx(90.0)  # 10 s/step, 9 steps left
    now[0] = 130.0
    mon.log(TRAIN, 3)
    assert mon.eta() == pytest.approx(70.0)


# --- helpers, registry, composite -----------------------------------------------------------


def test_stats():
    assert stats("critic/rewards", [1, 2, 6]) == {
        "critic/rewards/mean": 3.0,
        "critic/rewards/max": 6.0,
        "critic/rewards/min": 1.0,
    }
    assert stats("x", []) == {}


def test_build_monitors_defaults_and_names(tmp_path):
    mon = build_monitors(None, job_dir=tmp_path, total_steps=3, console=False)
    assert [type(m).__name__ for m in mon.monitors] == ["JsonlMonitor"]
    mon.close()
    mon = build_monitors(["none", "console", "JSONL"], job_dir=tmp_path)
    assert [type(m).__name__ for m in mon.monitors] == ["JsonlMonitor", "ConsoleMonitor"]
    mon.close()
    with pytest.raises(KeyError, match="did you mean 'wandb'"):
        build_monitors("wandbb", job_dir=tmp_path)
    assert {"jsonl", "console", "tensorboard", "wandb", "mlflow"} <= set(MONITORS.names())


@pytest.mark.parametrize("package", ["tensorboard", "wandb", "mlflow"])
def test_missing_package_is_skipped_with_one_clear_line(tmp_path, monkeypatch, caplog, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with caplog.at_level(logging.WARNING, logger="trinity.monitor"):
        mon = build_monitors(package, job_dir=tmp_path, console=False)
    assert [type(m).__name__ for m in mon.monitors] == ["JsonlMonitor"]
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"monitor '{package}' needs the '{package}' package: pip install {package}" in message
    assert "\n" not in message


def test_composite_survives_a_failing_monitor(caplog):
    class Broken:
        def log(self, metrics, step):
            raise ConnectionError("wandb down")

        def close(self):
            raise ConnectionError("still down")

    class Recorder:
        def __init__(self):
            self.seen = []

        def log(self, metrics, step):
            self.seen.append(step)

        def close(self):
            self.seen.append("closed")

    rec = Recorder()
    with CompositeMonitor([Broken(), rec]) as mon:
        mon.log(TRAIN, 1)
        mon.log(TRAIN, 2)
    assert rec.seen == [1, 2, "closed"]
    assert sum("failed to log" in r.message for r in caplog.records) == 1  # reported once


# --- tensorboard / wandb / mlflow ----------------------------------------------------------------


def test_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mon = build_monitors("tensorboard", job_dir=tmp_path, console=False)
    mon.log(TRAIN, 2)
    mon.log({**TRAIN, "critic/rewards/mean": 0.75}, 1)  # out of order is fine
    mon.close()
    acc = EventAccumulator(str(tmp_path / "monitor" / "tensorboard"))
    acc.Reload()
    scalars = acc.Scalars("critic/rewards/mean")
    assert sorted((s.step, s.value) for s in scalars) == [(1, 0.75), (2, 0.5)]


def test_wandb_offline_without_key(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    assert wandb_mode({}) == "offline"
    # a key but no reachable server: offline too; an explicit mode always wins
    assert wandb_mode({"api_key": "k", "base_url": "http://127.0.0.1:9"}) == "offline"
    assert wandb_mode({"mode": "disabled"}) == "disabled"

    mon = build_monitors(
        "wandb", job_dir=tmp_path, project="p", group="g", name="run1", console=False
    )
    wb = mon.monitors[1]
    assert wb.mode == "offline"
    mon.log(TRAIN, 2)
    mon.log(TRAIN, 1)
    mon.close()
    runs = list((tmp_path / "monitor" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
    assert wb.run.name == "run1" and wb.run.group == "g" and wb.run.project == "p"


def test_mlflow_local_store(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    mon = build_monitors(
        "mlflow", job_dir=tmp_path, project="proj", group="g", name="run1", console=False
    )
    ml = mon.monitors[1]
    mon.log({**TRAIN, "eval/gsm8k/accuracy/mean@4": 0.3}, 1)
    mon.log(TRAIN, 2)
    mon.close()
    assert (tmp_path / "monitor" / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=ml.uri)
    run = client.get_run(ml.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run1"
    assert run.data.tags["group"] == "g"
    history = client.get_metric_history(ml.run_id, "critic/rewards/mean")
    assert sorted(m.step for m in history) == [1, 2]
    assert client.get_metric_history(ml.run_id, "eval/gsm8k/accuracy/mean_at_4")[0].value == 0.3
    assert mlflow_key("a/b@4 c!") == "a/b_at_4 c_"


# --- plots -------------------------------------------------------------------------------------


def test_plot_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "metrics.jsonl"
    mon = JsonlMonitor(path)
    for step in range(1, 6):
        mon.log({"critic/rewards/mean": step / 5, "actor/loss": 1 / step}, step)
    mon.close()
    out = plot_metrics(path, ["critic/rewards/mean", "actor/loss"], tmp_path / "png" / "r.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="'nope' was logged by none of the runs"):
        plot_metrics(path, ["nope"], tmp_path / "x.png")


def test_a_resumed_run_forgets_exactly_its_own_records_of_the_steps_it_redoes(tmp_path):
    from trinity.monitor.base import RoleMonitor
    from trinity.monitor.jsonl import forget_steps_after

    path = tmp_path / "metrics.jsonl"
    other_process = JsonlMonitor(path)  # the trainer of a split run, still appending
    explorer, trainer = (
        RoleMonitor(JsonlMonitor(path), "explorer"),
        RoleMonitor(other_process, "trainer"),
    )
    for step in (1, 2, 3):
        explorer.log({"rollout/reward/mean": step}, step)
        trainer.log({"actor/pg_loss": step}, step)
    with open(path, "ab") as f:
        f.write(b'{"step": 3, "rollout/rew')  # torn by a kill
    assert forget_steps_after(path, 1, ["explorer"]) == 3  # explorer steps 2, 3 and the torn line
    trainer.log({"actor/pg_loss": 4}, 4)  # appends to the same file after the rewrite
    records = [(r["step"], r["role"]) for r in read_metrics(path)]
    assert records == [
        (1, "explorer"),
        (1, "trainer"),
        (2, "trainer"),
        (3, "trainer"),
        (4, "trainer"),
    ]
    assert forget_steps_after(tmp_path / "absent.jsonl", 0, ["trainer"]) == 0
