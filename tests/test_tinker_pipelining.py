"""The Tinker path hides latency: against ``trinity server`` with a fixed delay on every call,
a step's requests are in flight together, so N of them cost about one round trip, not N.

Real HTTP, the official SDK and a tiny random model; the latency is ``trinity server``'s own
``--inject-latency-ms`` (``ServerThread(latency_ms=...)`` in process, the CLI flag in a subprocess).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tinker
from tinker import types

from trinity.algorithms import adam_params_fn, build_loss_plan
from trinity.backends.tinker_sdk import TinkerSampler, TinkerSession, TinkerTrainer
from trinity.cli.main import main
from trinity.server import ServerThread, build_service
from trinity.server.runner import free_port
from trinity.trainer.trainer import Trainer
from trinity.workflows.types import Experience

LATENCY_S = 0.4
N_TASKS = 8
ROOT = Path(__file__).resolve().parents[1]


class Recorder:
    """Wraps the server's app: when each request arrived and when its answer was sent."""

    def __init__(self, app):
        self.app = app
        self.calls: list[tuple[str, float, float]] = []  # (path, arrived, answered)

    async def __call__(self, scope, receive, send):
        arrived = time.monotonic()
        await self.app(scope, receive, send)
        if scope["type"] == "http":
            name = "DELETE" if scope["method"] == "DELETE" else scope["path"].rsplit("/", 1)[-1]
            self.calls.append((name, arrived, time.monotonic()))

    def since(self, start: float) -> list[tuple[str, float, float]]:
        return sorted((c for c in self.calls if c[1] >= start), key=lambda c: c[1])


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """``trinity server`` with every call delayed ``LATENCY_S``; ``server.recorder`` sees each
    request after the delay, as the service behind a far network would."""
    service = build_service([str(tiny_model_dir)], tmp_path_factory.mktemp("srv"), {"tml-a": "a"})
    srv = ServerThread(service, latency_ms=LATENCY_S * 1000)
    delayed = srv.server.config.app  # InjectedLatency(app)
    delayed.app = srv.recorder = Recorder(delayed.app)
    with srv:
        yield srv


def base_model(tiny_model_dir: Path) -> str:
    return str(tiny_model_dir.resolve())


def test_a_steps_sampling_requests_are_in_flight_at_once(server, tiny_model_dir, tmp_path):
    """An explore step of N tasks on the Tinker backend: every sample request reaches the
    server before the first answer comes back, and the step costs about one call, not N.
    Serialized, N calls would take N times one call (each at least one injected delay)."""
    from test_explorer import TASKSET, explorer_for

    from trinity.buffer.tasksets import TasksetReader

    async def go():
        session = TinkerSession(server.url, "tml-a")
        sampler = await TinkerSampler.create(session, base_model(tiny_model_dir))
        tasks = TasksetReader(
            TASKSET,
            repeat_times=4,
            batch_size=N_TASKS,
            default_workflow="simple_workflow",
            default_reward_fn="accuracy_reward",
        )
        explorer, *_ = explorer_for(tmp_path, sampler, tasks)
        await explorer.explore_step(0, explorer.reader.read_batch())  # warm-up
        started = time.monotonic()
        await sampler.sample([1, 2, 3], 4, types.SamplingParams(max_tokens=8, seed=0))
        one = time.monotonic() - started
        started = time.monotonic()
        experiences, _ = await explorer.explore_step(1, explorer.reader.read_batch())
        many = time.monotonic() - started
        await session.close()
        return one, many, started, experiences

    one, many, started, experiences = asyncio.run(go())
    assert len(experiences) == N_TASKS * 4
    calls = server.recorder.since(started)
    samples = [c for c in calls if c[0] == "asample"]
    assert len(samples) == N_TASKS
    # asample answers with a request id at once; results come through retrieve_future
    first_answer = min(c[2] for c in calls if c[0] == "retrieve_future")
    assert all(arrived < first_answer for _, arrived, _ in samples), calls
    assert one >= LATENCY_S  # the delay is really there
    assert many < N_TASKS * one / 2, (one, many)


def grpo_batch() -> list[Experience]:
    batch = []
    for i in range(4):
        exp = Experience([1, 2, 3, 4 + i, 5], 2, [-1.0, -2.0, -0.1], [1, 1, 1], reward=float(i))
        exp.group_id, exp.advantages = "g", [i - 1.5] * 3
        batch.append(exp)
    return batch


def test_trainer_submits_optim_step_before_forward_backward_returns(
    server, tiny_model_dir, tmp_path
):
    """``Trainer.train_step`` on the Tinker backend: ``optim_step`` reaches the server before the
    ``forward_backward`` result is fetched, so the pair costs one call's round trips, not two."""

    async def go():
        session = TinkerSession(server.url, "tml-a")
        backend = await TinkerTrainer.create(
            session,
            base_model(tiny_model_dir),
            rank=4,
            seed=0,
            train_mlp=True,
            train_attn=True,
            train_unembed=True,
        )
        trainer = Trainer(
            backend=backend,
            plan=build_loss_plan({"algorithm_type": "grpo", "kl_loss_fn": "none"}),
            buffer=None,
            synchronizer=None,
            monitor=None,
            job_dir=tmp_path,
            train_batch_size=4,
            adam_params=adam_params_fn({}),
        )
        started = time.monotonic()
        metrics = await trainer.train_step(1, grpo_batch())
        await session.close()
        return started, metrics

    started, metrics = asyncio.run(go())
    assert metrics["time/update_actor"] > 0
    calls = server.recorder.since(started)
    paths = [c[0] for c in calls]
    assert paths.index("optim_step") < paths.index("retrieve_future"), calls
    fwd_bwd_fetched = min(c[2] for c in calls if c[0] == "retrieve_future")
    optim_arrived = next(c[1] for c in calls if c[0] == "optim_step")
    assert optim_arrived < fwd_bwd_fetched, calls


def test_switching_weights_deletes_the_old_ones_in_the_background(server, tiny_model_dir):
    """``switch`` returns without waiting on the deletion's round trip; ``close`` waits for it."""

    async def go():
        session = TinkerSession(server.url, "tml-a")
        model = base_model(tiny_model_dir)
        trainer = await TinkerTrainer.create(
            session, model, rank=4, seed=0, train_mlp=True, train_attn=True, train_unembed=True
        )
        first = await trainer.publish_sampler("first", "")
        second = await trainer.publish_sampler("second", "")
        sampler = await TinkerSampler.create(session, model, first)
        started = time.monotonic()
        await sampler.switch(second)
        switched = time.monotonic()
        await session.close()  # waits for the deletion
        return first, second, started, switched

    first, second, started, switched = asyncio.run(go())
    deletes = [c for c in server.recorder.since(started) if c[0] == "DELETE"]
    rest = tinker.RestClient(base_url=server.url, api_key="tml-a")
    assert rest.get_weights_info_by_tinker_path(second).result()
    with pytest.raises(tinker.NotFoundError):
        rest.get_weights_info_by_tinker_path(first).result()
    assert deletes and all(answered > switched for _, _, answered in deletes), deletes


@pytest.mark.parametrize(("tinker_enabled", "expected"), [(True, 12), (False, 2)])
def test_tinker_explorer_keeps_a_whole_step_in_flight(tmp_path, tinker_enabled, expected):
    """``runner_per_model`` bounds local engines' concurrency, not a remote service's."""
    from test_rl_loop import PLUGINS, write_config

    from trinity.config import load_config
    from trinity.launcher.launcher import explorer_concurrency
    from trinity.plugins import load_plugins

    load_plugins([str(PLUGINS)])
    path = write_config(
        tmp_path,
        Path("demo"),
        buffer={"batch_size": 12},
        explorer={"runner_per_model": 2, "rollout_model": {"engine_num": 1}},
    )
    config = load_config(path)
    config.model.tinker.enable = tinker_enabled
    assert explorer_concurrency(config) == expected


@pytest.mark.parametrize("bad", ["abc", "-5", "nan", "inf"])
def test_bad_latency_is_a_one_line_error_exit_2(bad, capsys):
    assert main(["server", "--model", "demo", "--inject-latency-ms", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "trinity server: error: --inject-latency-ms must be a number of milliseconds >= 0, "
        f"got '{bad}'"
    ]


def test_the_server_flag_delays_every_call(tiny_model_dir, tmp_path):
    """``trinity server --inject-latency-ms 500`` (a real process): a cheap call takes >= 0.5 s."""
    port = free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "trinity.cli.server", "--model", str(tiny_model_dir)]
    cmd += ["--port", str(port), "--state-dir", str(tmp_path / "state")]
    cmd += ["--inject-latency-ms", "500"]
    with log.open("w") as out:
        process = subprocess.Popen(
            cmd, stdout=out, stderr=out, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
    try:
        deadline = time.monotonic() + 120
        while "Application startup complete" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert "every call delayed 500 ms" in log.read_text()
        rest = tinker.RestClient(base_url=f"http://127.0.0.1:{port}", api_key="tml-x")
        rest.get_server_capabilities().result()
        started = time.monotonic()
        rest.get_server_capabilities().result()
        assert time.monotonic() - started >= 0.5
    finally:
        process.terminate()
        process.wait(timeout=30)
