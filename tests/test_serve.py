"""``mode: serve`` beside ``mode: train``: an external agent chats through the ``openai`` SDK,
rates the completions, commits, and the trainer of the same run trains on them; the proxy then
serves the weights the trainer published, and stops when the trainer has finished."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.test_rl_loop import job_dir, trainer_records, write_config
from trinity.cli.main import main
from trinity.monitor.jsonl import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def serve_config(tmp_path: Path, model_dir: Path, mode: str, **sections) -> Path:
    """The run's config for one of its two processes, in ``<mode>.yaml``."""
    path = write_config(
        tmp_path,
        model_dir,
        name="agent",
        mode=mode,
        buffer={
            "batch_size": 1,
            "train_batch_size": 4,
            "total_steps": 2,
            "explorer_input": {},  # no taskset: the agent brings the tasks
            "trainer_input": {"experience_buffer": {"max_read_timeout": 300}},
        },
        explorer={
            "proxy_port": 0,
            "listen_address": "127.0.0.1",
            "service_status_check_interval": 1,
            "rollout_model": {"engine_num": 1, "seed": 7},
        },
        **sections,
    )
    return path.rename(path.with_name(f"{mode}.yaml"))


def wait_for(predicate, what: str, timeout: float = 240.0, process=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(
                f"serve exited ({process.returncode}) before {what}: {log(process)}"
            )
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {log(process) if process else ''}")


def log(process) -> str:
    return Path(process.args[-1]).with_suffix(".log").read_text()[-3000:]


@pytest.fixture
def tinker_service(tiny_model_dir, tmp_path, monkeypatch):
    """A ``trinity server`` both processes use (Tinker sampler paths are the service's)."""
    from trinity.server import ServerThread, build_service

    service = build_service([str(tiny_model_dir)], tmp_path / "srv", {"tml-serve": "serve"})
    srv = ServerThread(service).start()
    monkeypatch.setenv("TRINITY_API_KEY", "tml-serve")
    yield srv.url
    srv.stop()


@pytest.mark.parametrize("backend", ["local", "tinker"])
def test_serve_feedback_commit_trains_and_new_weights_are_served(
    request, tmp_path, tiny_model_dir, backend
):
    model = yaml.safe_load(write_config(tmp_path, tiny_model_dir).read_text())["model"]
    if backend == "tinker":
        model["tinker"].update(enable=True, base_url=request.getfixturevalue("tinker_service"))
    job = job_dir(tmp_path, "agent")
    url_file = job / "explorer_server_url.txt"
    config = serve_config(tmp_path, tiny_model_dir, "serve", model=model)
    serve_log = config.with_suffix(".log")
    serve = subprocess.Popen(
        [sys.executable, "-m", "trinity.cli.main", "run", "--config", str(config)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=serve_log.open("w"),
        stderr=subprocess.STDOUT,
    )
    trained: dict[str, int] = {}
    train_config = serve_config(tmp_path, tiny_model_dir, "train", model=model)
    trainer = threading.Thread(
        target=lambda: trained.update(status=main(["run", "--config", str(train_config)]))
    )
    try:
        base_url = wait_for(
            lambda: url_file.exists() and url_file.read_text(), "the URL", 240, serve
        )
        trainer.start()
        client = openai.OpenAI(base_url=base_url, api_key="EMPTY", max_retries=0)
        assert [m.id for m in client.models.list().data] == [str(tiny_model_dir)]
        http = httpx.Client(base_url=base_url.removesuffix("/v1"), trust_env=False)
        ids = chat_twice(client)
        refused = http.post("/feedback", json={"reward": "high", "msg_ids": ids})
        assert refused.status_code == 400 and "'reward' must be a number" in refused.text
        refused = http.post("/feedback", json={"reward": 1.0, "msg_ids": ["chatcmpl-nope"]})
        assert refused.status_code == 400 and "unknown or already rated" in refused.text
        rate_and_commit(http, ids)
        # the trainer takes these 4 experiences as step 1 and publishes; the proxy switches
        wait_for(lambda: http.get("/health").json()["model_version"] == 1, "new weights", 240)
        rate_and_commit(http, chat_twice(client))  # sampled from version 1: step 2
        assert serve.wait(timeout=240) == 0  # the trainer finished: the proxy stops
        trainer.join(timeout=240)
        assert trained == {"status": 0}
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert "serving model version 1" in serve_log.read_text()
    steps = trainer_records(job)
    assert sorted(steps) == [1, 2]
    for step in steps.values():
        assert step["critic/rewards/mean"] == pytest.approx(0.5) and step["actor/final_loss"] != 0
    commits = [
        r for r in read_metrics(job / "monitor" / "metrics.jsonl") if r["role"] == "explorer"
    ]
    assert [(r["step"], r["rollout/model_version"]) for r in commits] == [(1, 0.0), (2, 1.0)]


def chat_twice(client) -> list[str]:
    """Two completions of 2 choices each; their ids (the msg_ids to rate)."""
    ids = []
    for turn in range(2):
        completion = client.chat.completions.create(
            model="policy",
            messages=[{"role": "user", "content": f"Question {turn}?"}],
            n=2,
            max_tokens=5,
            logprobs=True,
        )
        assert len(completion.choices) == 2 and completion.choices[0].token_ids
        ids.append(completion.id)
    return ids


def rate_and_commit(http, ids: list[str]) -> None:
    for msg_id, reward in zip(ids, (1.0, 0.0), strict=True):
        answer = http.post(
            "/feedback", json={"reward": reward, "msg_ids": [msg_id], "task_id": "t"}
        )
        assert answer.json() == {"status": "success", "experience_count": 2}
    assert http.post("/commit").json() == {"status": "success", "experience_count": 4}


def test_the_proxy_keeps_the_newest_unrated_completions_and_refuses_bad_feedback(tiny_model_dir):
    """In-process, against a scripted backend (the real tokenizer): eviction and validation."""
    import asyncio

    from transformers import AutoTokenizer

    from tests.test_agents import ScriptedBackend
    from trinity.buffer.experience import ExperienceQueue
    from trinity.explorer.proxy import FeedbackError, Proxy
    from trinity.explorer.sampler import RolloutSettings

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    queue = ExperienceQueue()
    proxy = Proxy(
        backend=ScriptedBackend(tokenizer, ["Four.<|im_end|>"]),
        settings=RolloutSettings(enable_history=True, enable_openai_api=True),
        buffer=queue,
        synchronizer=None,
        advantage_fn=lambda experiences: {},
        max_unrated=2,
    )

    async def main():
        body = {"messages": [{"role": "user", "content": "2 + 2?"}]}
        ids = [(await proxy.chat(body)).id for _ in range(3)]
        with pytest.raises(FeedbackError, match="unknown or already rated"):
            proxy.feedback({"reward": 1, "msg_ids": ids[:1]})  # evicted
        for bad, message in [
            ({"reward": float("nan"), "msg_ids": ids[1:]}, "must be finite"),
            ({"reward": True, "msg_ids": ids[1:]}, "must be a number"),
            ({"reward": 1, "msg_ids": []}, "non-empty list"),
            ([1], "JSON object"),
        ]:
            with pytest.raises(FeedbackError, match=message):
                proxy.feedback(bad)
        assert proxy.feedback({"reward": 1, "msg_ids": ids[1:], "task_id": "t"}) == 2
        assert await proxy.commit() == 2 and await proxy.commit() == 0
        (first, second) = await queue.get_batch(2)
        assert first.group_id == second.group_id == "serve-1/t" and first.reward == 1.0
        assert tokenizer.decode(first.tokens[first.prompt_length :]) == "Four.<|im_end|>"

        # streamed through the proxy's HTTP app with the SDK; its chunks' id is rated
        transport = httpx.ASGITransport(app=proxy.app())
        client = openai.AsyncOpenAI(
            base_url="http://proxy/v1",
            api_key="EMPTY",
            max_retries=0,
            http_client=httpx.AsyncClient(transport=transport),
        )
        stream = await client.chat.completions.create(
            model="policy", stream=True, stream_options={"include_usage": True}, **body
        )
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Four."
        assert chunks[-2].choices[0].finish_reason == "stop"
        sampled = len(tokenizer.encode("Four.<|im_end|>", add_special_tokens=False))
        assert chunks[-1].usage.completion_tokens == sampled
        assert proxy.feedback({"reward": 0.5, "msg_ids": [chunks[0].id], "task_id": "s"}) == 1

    asyncio.run(main())
