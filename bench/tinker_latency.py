"""GRPO on the Tinker backend against ``trinity server`` with and without injected latency.

    python bench/tinker_latency.py [--model demo|tiny] [--steps 4] [--rounds 2] [--latency-ms 100]

Thinking Machines' service is tens to hundreds of ms away; this measures how much of that a run
hides. The same GRPO config (bench/tinker_backend.yaml: 4 prompts x 4 samples x <= 32 new tokens
by default, LoRA rank 32; ``synchronizer.sync_offset`` 1, so the next step's sampling overlaps
this step's training) runs against a ``trinity server`` subprocess on a loopback port, as is and
with ``--inject-latency-ms``, alternating (base, latency, base, latency, ...) so that a change in
the machine's load hits both. Step time: the median of the trainer's ``perf/time_per_step``
after each run's first step (warm-up): the mean, as with ``sync_offset: 1`` steps alternate
between waiting and not.

The figure that does not depend on how fast the server computes: the latency a step pays,
(latency median - base median) / latency per call, is the number of round trips left on a
step's critical path. ``--model tiny`` (a 2-layer random model: compute is small, so those round
trips stand out) measures it; the ratio for any model follows as (step + k x latency) / step,
printed for the measured base step. Target: ratio <= 1.15. Results go to docs/benchmarks.md
under "Speed: Tinker path latency".
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


def start_server(state_dir: Path, latency_ms: float, model: str) -> tuple[subprocess.Popen, str]:
    """``trinity server`` in its own process, as a remote service would be."""
    port = free_port()
    cmd = [sys.executable, "-m", "trinity.cli.server", "--model", model, "--port", str(port)]
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


def run(
    tmp: Path, name: str, args: argparse.Namespace, latency_ms: float, model: str
) -> list[float]:
    """Seconds of each trainer step (perf/time_per_step)."""
    server, url = start_server(tmp / f"server-{name}", latency_ms, model)
    try:
        overrides = [
            f"checkpoint_root_dir={tmp}",
            f"name={name}",
            f"buffer.total_steps={args.steps}",
            f"buffer.batch_size={args.prompts}",
            f"model.max_response_tokens={args.new_tokens}",
            "model.tinker.enable=true",
            f"model.tinker.base_url={url}",
            f"model.model_path={model}",
            f"model.tinker.base_model={model}",
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
    parser.add_argument("--model", choices=("demo", "tiny"), default="demo")
    parser.add_argument("--steps", type=int, default=4, help="steps per run, first is warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="(base, latency) run pairs")
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
    base: list[float] = []
    late: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = resolve_model_path("demo")
        if args.model == "tiny":
            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import build_tiny_model

            model = str(build_tiny_model(Path(tmp) / "tiny-model"))
        for i in range(args.rounds):
            base += run(Path(tmp), f"base-{i}", args, 0.0, model)[1:]
            late += run(Path(tmp), f"latency-{i}", args, args.latency_ms, model)[1:]
    base_s, late_s = statistics.mean(base), statistics.mean(late)
    ratio = late_s / base_s
    trips = (late_s - base_s) / (args.latency_ms / 1000)
    demo_hint = (
        ""
        if args.model == "demo"
        else " (the demo model's step is longer: run `--model demo` for its own figure)"
    )
    lines = [
        *machine,
        "",
        f"- load average {load:.1f} at the start (other processes share these cores); "
        f"{time.monotonic() - started:.0f} s in all",
        "",
        f"`python bench/tinker_latency.py --model {args.model}`: {args.model} model on `trinity "
        f"server` (a subprocess, real HTTP, official SDK), {args.prompts} prompts x 4 samples x "
        f"<= {args.new_tokens} new tokens, LoRA rank 32, sync_offset {args.sync_offset}; "
        f"{args.rounds} alternating pairs of runs, {args.steps - 1} steps each after a warm-up "
        "step; means over all.",
        "",
        "| injected latency per call | s/step (mean) | steps (s) |",
        "|---:|---:|---|",
        f"| 0 ms | {base_s:.2f} | {', '.join(f'{s:.2f}' for s in base)} |",
        f"| {args.latency_ms:g} ms | {late_s:.2f} | {', '.join(f'{s:.2f}' for s in late)} |",
        "",
        f"- round trips left on a step's critical path: ({late_s:.2f} - {base_s:.2f}) s / "
        f"{args.latency_ms / 1000:g} s = **{trips:.1f}**"
        + (
            " (below this run's step-to-step noise: read it from `--model tiny`)"
            if trips < 0
            else ""
        ),
        f"- ratio with / without latency: **{ratio:.2f}x** (target <= 1.15x): "
        f"{'met' if ratio <= 1.15 else 'NOT met'}{demo_hint}",
        f"- arithmetic: the target holds while a step computes >= {max(trips, 0):.1f} x "
        f"{args.latency_ms / 1000:g} s / 0.15 = {max(trips, 0) * args.latency_ms / 150:.1f} s",
    ]
    print("\n".join(lines[len(machine) :]))
    if not args.no_write:
        section = "Speed: Tinker path latency" + (" (tiny model)" if args.model == "tiny" else "")
        write_section(section, lines, ROOT / "docs" / "benchmarks.md")


if __name__ == "__main__":
    main()
