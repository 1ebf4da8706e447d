"""Idle sessions expire and free their models; checkpoint TTLs are set (SDK, ``tinker`` CLI)
and enforced by the server's reaper; ``tinker checkpoint download`` of a ``weights/`` path."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime

import httpx
import pytest
import tinker
from tinker import types

from trinity.server import ServerThread, build_service

RANK = 4
TIMEOUT_S = 30
IDLE_S = 2.0  # the reaper then looks every 0.5 s
KEY = "tml-expiry"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    service = build_service(
        [str(tiny_model_dir)], tmp_path_factory.mktemp("srv"), {}, session_idle_s=IDLE_S
    )
    srv = ServerThread(service).start()
    yield srv
    srv.stop()


def datums() -> list[types.Datum]:
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints([5, 6, 7, 8]),
            loss_fn_inputs={"target_tokens": [6, 7, 8, 9], "weights": [1.0] * 4},
        )
    ]


def wait_for(condition, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_idle_session_expires_and_frees_its_models(server):
    """The SDK heartbeats every 10 s, longer than the 2 s timeout here: the session looks like
    a client that went away without close()."""
    sc = tinker.ServiceClient(base_url=server.url, api_key=KEY)
    tc = sc.create_lora_training_client(base_model=server.service.models[0].name, rank=RANK).result(
        TIMEOUT_S
    )
    tc.forward_backward(datums(), "cross_entropy").result(TIMEOUT_S)
    snapshot = tc.save_weights_and_get_sampling_client().result(TIMEOUT_S)
    prompt, params = types.ModelInput.from_ints([5, 6, 7]), types.SamplingParams(max_tokens=2)
    assert len(snapshot.sample(prompt, 1, params).result(TIMEOUT_S).sequences) == 1
    session_id = tc.model_id.split(":train:")[0]
    engine = server.service.models[0].engine
    assert engine.model_info(tc.model_id)["rank"] == RANK

    session = server.service.sessions[session_id]
    wait_for(lambda: session.finished is not None, "the idle session to expire")
    assert session.finished.startswith("expired")

    def removed() -> bool:
        try:
            engine.model_info(tc.model_id)
        except (KeyError, ValueError):
            return True
        return False

    wait_for(removed, "the expired session's model to leave the engine")
    with pytest.raises(tinker.BadRequestError, match="expired: no heartbeat or call for 2 s"):
        tc.forward_backward(datums(), "cross_entropy").result(TIMEOUT_S)
    with pytest.raises(tinker.BadRequestError, match=r"freed because its session .* \(expired"):
        snapshot.sample(prompt, 1, params).result(TIMEOUT_S)
    heartbeat = httpx.post(
        f"{server.url}/api/v1/session_heartbeat",
        json={"session_id": session_id, "type": "session_heartbeat"},
        headers={"X-API-Key": KEY},
    )
    assert heartbeat.status_code == 410 and "expired" in heartbeat.json()["detail"]


def test_heartbeats_keep_a_session_alive(server):
    headers = {"X-API-Key": KEY}
    with httpx.Client(base_url=f"{server.url}/api/v1", headers=headers) as http:
        created = http.post(
            "/create_session",
            json={
                "tags": [],
                "user_metadata": {},
                "sdk_version": "0.38.0",
                "type": "create_session",
            },
        )
        session_id = created.json()["session_id"]
        for _ in range(int(3 * IDLE_S / 0.4)):
            beat = http.post(
                "/session_heartbeat", json={"session_id": session_id, "type": "session_heartbeat"}
            )
            assert beat.status_code == 200, beat.text
            time.sleep(0.4)
        assert server.service.sessions[session_id].finished is None
        http.post(f"/sessions/{session_id}/finish", json={"reason": {"type": "success"}})


def tinker_cli(server, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TINKER_BASE_URL": server.url, "TINKER_API_KEY": KEY}
    env["TINKER_TELEMETRY"] = "0"
    return subprocess.run(
        [sys.executable, "-m", "tinker.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def expiry(rest: tinker.RestClient, path: str) -> datetime | None:
    run_id = path.removeprefix("tinker://").split("/")[0]
    listed = rest.list_checkpoints(run_id).result(TIMEOUT_S).checkpoints
    (ckpt,) = [c for c in listed if c.tinker_path == path]
    return ckpt.expires_at


def test_checkpoint_ttls_are_set_and_reaped(server, tmp_path):
    sc = tinker.ServiceClient(base_url=server.url, api_key=KEY)
    tc = sc.create_lora_training_client(base_model=server.service.models[0].name, rank=RANK).result(
        TIMEOUT_S
    )
    rest = tinker.RestClient(base_url=server.url, api_key=KEY)
    short = tc.save_state("short", ttl_seconds=1).result(TIMEOUT_S).path
    kept = tc.save_state("kept").result(TIMEOUT_S).path
    directory = server.service.store.checkpoint(tc.model_id, "weights/short")["directory"]
    assert os.path.isdir(directory)

    # the reaper deletes the expired checkpoint: gone from listings, lookups and disk
    wait_for(lambda: not os.path.isdir(directory), "the reaper to delete the expired checkpoint")
    run_checkpoints = rest.list_checkpoints(tc.model_id).result(TIMEOUT_S).checkpoints
    assert [c.tinker_path for c in run_checkpoints] == [kept]
    with pytest.raises(tinker.NotFoundError):
        sc.create_sampling_client(model_path=short).result(TIMEOUT_S)

    # set-ttl through the SDK and the CLI: Tinker's bounds, removal
    assert expiry(rest, kept) is None
    rest.set_checkpoint_ttl_from_tinker_path(kept, 7200).result(TIMEOUT_S)
    left = (expiry(rest, kept) - datetime.now(UTC)).total_seconds()
    assert 7100 < left <= 7200
    done = tinker_cli(server, "checkpoint", "set-ttl", kept, "--remove")
    assert done.returncode == 0, done.stderr
    assert expiry(rest, kept) is None
    done = tinker_cli(server, "checkpoint", "set-ttl", kept, "--ttl", "3600")
    assert done.returncode == 0, done.stderr
    assert 3500 < (expiry(rest, kept) - datetime.now(UTC)).total_seconds() <= 3600
    with pytest.raises(tinker.BadRequestError, match="ttl_seconds must be an integer from 3600"):
        rest.set_checkpoint_ttl_from_tinker_path(kept, 5).result(TIMEOUT_S)
    with pytest.raises(tinker.NotFoundError):
        rest.set_checkpoint_ttl_from_tinker_path(short, 3600).result(TIMEOUT_S)

    # `tinker checkpoint download` of a weights/ path: export with a TTL, renew it, delete it
    done = tinker_cli(server, "checkpoint", "download", kept, "--output", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    files = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    kinds = {c.checkpoint_type for c in rest.list_user_checkpoints().result(TIMEOUT_S).checkpoints}
    assert "external" not in kinds  # the temporary export was deleted


def test_cli_flag_sets_the_idle_timeout(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import trinity.server
    from trinity.cli.server import main

    idle = []

    def serve(service, *args):  # record what the server would run with, then stop it
        idle.append(service.idle.idle_s)
        service.close(autosave=False)

    monkeypatch.setattr(trinity.server, "serve", serve)
    base = ["--model", str(tiny_model_dir), "--state-dir", str(tmp_path / "state")]
    assert main([*base, "--session-idle-timeout", "-5"]) == 2
    assert "--session-idle-timeout must be >= 0" in capsys.readouterr().err
    assert main([*base, "--session-idle-timeout", "90"]) == 0
    assert main([*base, "--session-idle-timeout", "0"]) == 0
    assert main(base) == 0
    assert idle == [90, None, 600]  # 0 = never
