"""GRPO on the Tinker backend against ``trinity server`` with and without injected latency.

    python bench/tinker_latency.py [--steps 5] [--latency-ms 100] [--sync-offset 1]

Thinking Machines' service is tens to hundreds of ms away; this measures how much of that a run
hides. The same GRPO config (bench/tinker_backend.yaml: demo model, 4 prompts x 4 samples x
<= 32 new tokens by default, LoRA rank 32; ``synchronizer.sync_offset`` 1, so the next step's
sampling overlaps this step's training) runs twice against a ``trinity server`` subprocess on a
loopback port: once as is, once with ``--inject-latency-ms``. Step time is the median of the
trainer's ``perf/time_per_step`` after the first step (warm-up). Target: ratio <= 1.15.
Results go to docs/benchmarks.md under "Speed: Tinker path latency".
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.engine import machine_section, write_section  # noqa: E402
from bench.two_process import cpu_kind  # noqa: E402
from trinity.config import load_config  # noqa: E402
from trinity.engine import configure_process  # noqa: E402
from trinity.engine.demo_model import resolve_model_path  # noqa: E402
from trinity.launcher import launcher  # noqa: E402
from trinity.monitor import read_metrics  # noqa: E402
from trinity.server.runner import free_port  # noqa: E402

API_KEY = "tml-bench"


def start_server(state_dir: Path, latency_ms: float) -> tuple[subprocess.Popen, str]:
    """``trinity server`` in its own process, as a remote service would be."""
    port = free_port()
    cmd = [sys.executable, "-m", "trinity.cli.server", "--model", "demo", "--port", str(port)]
    cmd += ["--state-dir", str(state_dir), "--api-key", f"{API_KEY}=bench"]
    cmd += ["--inject-latency-ms", str(latency_ms)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = state_dir.with_suffix(".log")
    with log.open("w") as out:
        server = subprocess.Popen(cmd, env=env, stderr=out, stdout=out)
    while "Application startup complete" not in log.read_text():  # uvicorn's readiness line
        if server.poll() is not None:
            raise RuntimeError(f"trinity server exited: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    return server, f"http://127.0.0.1:{port}"


def run(tmp: Path, name: str, args: argparse.Namespace, latency_ms: float) -> list[float]:
    """Seconds of each trainer step (perf/time_per_step)."""
    server, url = start_server(tmp / f"server-{name}", latency_ms)
    try:
        overrides = [
            f"checkpoint_root_dir={tmp}",
            f"name={name}",
            f"buffer.total_steps={args.steps}",
            f"buffer.batch_size={args.prompts}",
            f"model.max_response_tokens={args.new_tokens}",
            "model.tinker.enable=true",
            f"model.tinker.base_url={url}",
            f"model.tinker.base_model={resolve_model_path('demo')}",
            f"synchronizer.sync_offset={args.sync_offset}",
        ]
        os.environ["TRINITY_API_KEY"] = API_KEY
        config = load_config(ROOT / "bench" / "tinker_backend.yaml", overrides=overrides)
        launcher.run(config)
    finally:
        server.terminate()
        server.wait(timeout=60)
    records = read_metrics(Path(config.checkpoint_job_dir) / "monitor" / "metrics.jsonl")
    return [r["perf/time_per_step"] for r in records if "perf/time_per_step" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="steps per run, first is warm-up")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--sync-offset", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (x 4 samples)")
    parser.add_argument("--new-tokens", type=int, default=32, help="max new tokens per sample")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    configure_process()
    machine = [cpu_kind(), *machine_section({})]
    print("\n".join(machine), flush=True)
    load = os.getloadavg()[0]
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        base = run(Path(tmp), "no-latency", args, 0.0)
        late = run(Path(tmp), "latency", args, args.latency_ms)
    base_s, late_s = statistics.median(base[1:]), statistics.median(late[1:])
    ratio = late_s / base_s
    lines = [
        *machine,
        f"- load average {load:.1f} at the start (other processes share these cores); "
        f"{time.monotonic() - started:.0f} s in all",
        "",
        f"Demo model on `trinity server` (a subprocess, real HTTP, official SDK), {args.prompts} "
        f"prompts x 4 samples x <= {args.new_tokens} new tokens, LoRA rank 32, sync_offset "
        f"{args.sync_offset}; median of "
        f"{args.steps - 1} steps after one warm-up step.",
        "",
        "| injected latency per call | s/step (median) | steps (s) |",
        "|---:|---:|---|",
        f"| 0 ms | {base_s:.2f} | {', '.join(f'{s:.2f}' for s in base)} |",
        f"| {args.latency_ms:g} ms | {late_s:.2f} | {', '.join(f'{s:.2f}' for s in late)} |",
        "",
        f"- ratio with / without latency: **{ratio:.2f}x** (target <= 1.15x): "
        f"{'met' if ratio <= 1.15 else 'NOT met'}",
    ]
    print("\n".join(lines[len(machine) :]))
    if not args.no_write:
        write_section("Speed: Tinker path latency", lines, ROOT / "docs" / "benchmarks.md")


if __name__ == "__main__":
    main()
