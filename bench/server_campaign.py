"""A kill -9 and tenant campaign against ``trinity server`` with the official SDK (issue 18).

Everything is real: ``trinity server`` runs as a subprocess on a tiny random Llama, the clients
are ``tinker`` SDK clients over loopback HTTP, and the server is killed with SIGKILL.

kill -9: scenarios kill the server during an optim step, during ``save_state``, during
``save_weights_for_sampler``, right after a save was acknowledged, during an overwrite, during
sampling, and with two clients mid-loop; then restart it on the same data dir and check that
every checkpoint a client was told is saved (whenever that answer came) is listed by the
``RestClient`` and loads (a training state gives the forward loss recorded when it was saved; a
sampler checkpoint samples), that every future still pending at the kill resolves or fails
within ``--hang-s`` seconds, and that a client resumes from its last state and trains on.

tenants: N clients under N API keys train, save and sample at once; their losses and sampled
tokens must equal those of each client run alone. Then every key probes every other key's runs,
checkpoints, sessions and samplers by their exact ``tinker://`` paths and ids (read, list, load,
sample, delete, publish, TTL, export, download) and must be refused; the victim's checkpoints
must be intact afterwards.

    python bench/server_campaign.py [--rounds 1] [--tenants 4] [--out campaign.json]

Prints a summary table and writes it as JSON to ``--out``. Exit status 1 if anything was lost,
hung, leaked or differed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TINKER_TELEMETRY", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import tinker  # noqa: E402
from engine_probe import datums  # noqa: E402  (tests/engine_probe.py)
from tinker import types  # noqa: E402

from trinity.server.runner import free_port  # noqa: E402

RANK = 4
ADAM = types.AdamParams(learning_rate=1e-2)
GREEDY = types.SamplingParams(max_tokens=4, temperature=0.0)


PROBE = datums(12345)
PROMPT = types.ModelInput.from_ints([11, 12, 13, 14])


class Server:
    """``python -m trinity.cli.server`` on a free port; ``kill()`` is SIGKILL."""

    def __init__(self, model: Path, data_dir: Path, keys: dict[str, str]):
        self.model, self.data_dir, self.keys = model, data_dir, keys
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> float:
        cmd = [sys.executable, "-m", "trinity.cli.server", "--model", str(self.model)]
        cmd += ["--port", str(self.port), "--state-dir", str(self.data_dir)]
        for key, user in self.keys.items():
            cmd += ["--api-key", f"{key}={user}"]
        log = open(self.data_dir.parent / f"server-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(f"{self.url}/api/v1/healthz", timeout=2).is_success:
                    return time.monotonic() - t0
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"server did not start; see {log.name}")
            time.sleep(0.2)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


def loss(tc: tinker.TrainingClient) -> float:
    return tc.forward(PROBE, "cross_entropy").result().metrics["loss:sum"]


def step(tc: tinker.TrainingClient, seed: int) -> float:
    out = tc.forward_backward(datums(seed), "cross_entropy")
    tc.optim_step(ADAM).result()
    return out.result().metrics["loss:sum"]


class KillCampaign:
    def __init__(self, server: Server, key: str, hang_s: float, rng: random.Random):
        self.srv, self.key, self.hang_s, self.rng = server, key, hang_s, rng
        self.base = str(server.model)
        self.states: dict[str, float | None] = {}  # acked state path -> loss at save (if known)
        self.samplers: set[str] = set()
        self.pending: list[tinker.APIFuture] = []
        self.count = {"scenarios": 0, "kills": 0, "acked": 0, "lost": 0, "hung": 0}
        self.count |= {"pending_at_kill": 0, "pending_resolved": 0, "pending_failed": 0}
        self.count |= {"resumed": 0, "resume_failed": 0}
        self.names = 0
        self.problems: list[str] = []

    def client(self) -> tinker.ServiceClient:
        return tinker.ServiceClient(base_url=self.srv.url, api_key=self.key)

    def fresh(self) -> tinker.TrainingClient:
        return self.client().create_lora_training_client(
            base_model=self.base, rank=RANK, seed=self.rng.randrange(100)
        )

    def name(self) -> str:
        self.names += 1
        return f"c{self.names}"

    def save(self, tc: tinker.TrainingClient, sync: bool, overwrite: str | None = None):
        fut = tc.save_state(overwrite or self.name(), overwrite=overwrite is not None)
        if sync:
            path = fut.result().path
            self.states[path] = loss(tc)
            return path
        self.pending.append(("state", fut))
        return fut

    def save_sampler(self, tc: tinker.TrainingClient, sync: bool):
        fut = tc.save_weights_for_sampler(self.name())
        if sync:
            self.samplers.add(fut.result().path)
            return
        self.pending.append(("sampler", fut))

    def kill_after(self, max_delay_s: float) -> None:
        time.sleep(self.rng.uniform(0, max_delay_s))
        self.srv.kill()
        self.count["kills"] += 1

    # scenarios: each leaves the server killed
    def during_optim(self, tc):
        for seed in range(2):
            step(tc, seed)
        self.save(tc, sync=True)
        self.pending.append(("fb", tc.forward_backward(datums(7), "cross_entropy")))
        self.pending.append(("optim", tc.optim_step(ADAM)))
        self.kill_after(0.05)

    def during_save(self, tc):
        step(tc, 1)
        self.save(tc, sync=True)
        step(tc, 2)
        self.save(tc, sync=False)
        self.kill_after(0.1)

    def during_sampler_save(self, tc):
        step(tc, 3)
        self.save_sampler(tc, sync=True)
        step(tc, 4)
        self.save_sampler(tc, sync=False)
        self.kill_after(0.1)

    def after_ack(self, tc):
        step(tc, 5)
        self.save(tc, sync=True)
        self.save_sampler(tc, sync=True)
        self.srv.kill()
        self.count["kills"] += 1

    def during_overwrite(self, tc):
        step(tc, 6)
        path = self.save(tc, sync=True)
        old = self.states[path]
        step(tc, 7)
        new = loss(tc)
        self.pending.append(("overwrite", tc.save_state(path.rsplit("/", 1)[1], overwrite=True)))
        self.overwrites.append((path, old, new))
        self.kill_after(0.1)

    def during_sampling(self, tc):
        step(tc, 8)
        path = tc.save_weights_for_sampler(self.name()).result().path
        self.samplers.add(path)
        sc = self.client().create_sampling_client(model_path=path).result()
        for _ in range(4):
            self.pending.append(("sample", sc.sample(PROMPT, 2, GREEDY)))
        self.kill_after(0.1)

    def two_clients_mid_loop(self, tc):
        other = self.fresh().result()
        stop_at = time.monotonic() + self.rng.uniform(0.5, 3.0)
        threads = [
            threading.Thread(target=self._loop, args=(c, stop_at), daemon=True) for c in (tc, other)
        ]
        for t in threads:
            t.start()
        time.sleep(max(0.0, stop_at - time.monotonic()))
        self.srv.kill()
        self.count["kills"] += 1
        self.threads = threads  # joined once the server is back

    def _loop(self, tc, stop_at):
        seed = 100
        while time.monotonic() < stop_at:
            seed += 1
            fb = tc.forward_backward(datums(seed), "cross_entropy")
            opt = tc.optim_step(ADAM)
            save = tc.save_state(self.name())
            self.pending += [("fb", fb), ("optim", opt), ("state", save)]
            try:
                save.result(timeout=self.hang_s)
            except Exception:
                return

    SCENARIOS = (
        "during_optim",
        "during_save",
        "during_sampler_save",
        "after_ack",
        "during_overwrite",
        "during_sampling",
        "two_clients_mid_loop",
    )

    def run(self, rounds: int) -> dict:
        self.overwrites: list[tuple[str, float, float]] = []
        self.threads: list[threading.Thread] = []
        self.srv.start()
        last_state: str | None = None
        for r in range(rounds):
            for scenario in self.SCENARIOS:
                if last_state is None:
                    tc = self.fresh().result()
                else:
                    tc = self.client().create_training_client_from_state_with_optimizer(last_state)
                    tc = tc.result()
                print(f"round {r} {scenario}", flush=True)
                getattr(self, scenario)(tc)
                self.count["scenarios"] += 1
                self.srv.start()
                for t in self.threads:
                    t.join(self.hang_s)
                self.threads = []
                self.settle()
                last_state = self.check()
                if last_state is not None:
                    self.resume(last_state)
        self.srv.stop()
        self.count["acked"] = len(self.states) + len(self.samplers)
        return self.count

    def settle(self) -> None:
        """Every future pending at the kill resolves or fails within ``hang_s``."""
        deadline = time.monotonic() + self.hang_s
        for kind, fut in self.pending:
            self.count["pending_at_kill"] += 1
            try:
                value = fut.result(timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                self.count["hung"] += 1
                self.problems.append(f"{kind} future hung > {self.hang_s}s")
                continue
            except Exception:
                self.count["pending_failed"] += 1
                continue
            self.count["pending_resolved"] += 1
            if kind == "overwrite":  # acked: the new copy, whose loss check() reads
                self.states[value.path] = None
            elif kind == "state":
                self.states.setdefault(value.path, None)
            elif kind == "sampler":
                self.samplers.add(value.path)
        self.pending = []

    def check(self) -> str | None:
        """Every acknowledged checkpoint is listed and loads; returns the newest state."""
        rest = tinker.RestClient(base_url=self.srv.url, api_key=self.key)
        listed = {
            c.tinker_path for c in rest.list_user_checkpoints(limit=10000).result().checkpoints
        }
        sc = self.client()
        overwritten = {p: (old, new) for p, old, new in self.overwrites}
        newest = None
        for path, expected in list(self.states.items()):
            try:
                assert path in listed, "not listed"
                got = loss(sc.create_training_client_from_state_with_optimizer(path).result())
                if path in overwritten:  # old or new copy, never neither
                    assert any(abs(got - x) < 1e-4 for x in overwritten[path]), got
                    if expected is None:  # the overwrite was acked: the new one
                        assert abs(got - overwritten[path][1]) < 1e-4, got
                    self.states[path] = got
                elif expected is not None:
                    assert abs(got - expected) < 1e-4, (got, expected)
                else:
                    self.states[path] = got
                newest = path
            except Exception as exc:  # noqa: BLE001
                self.count["lost"] += 1
                self.problems.append(f"{path}: {exc!r}"[:300])
                self.states.pop(path)
        self.overwrites = []
        for path in list(self.samplers):
            try:
                assert path in listed, "not listed"
                sc.create_sampling_client(model_path=path).result().sample(
                    PROMPT, 1, GREEDY
                ).result()
            except Exception as exc:  # noqa: BLE001
                self.count["lost"] += 1
                self.problems.append(f"{path}: {exc!r}"[:300])
                self.samplers.discard(path)
        return newest

    def resume(self, path: str) -> None:
        try:
            tc = self.client().create_training_client_from_state_with_optimizer(path).result()
            assert np.isfinite(step(tc, 999)) and np.isfinite(loss(tc))
            self.count["resumed"] += 1
        except Exception as exc:  # noqa: BLE001
            self.count["resume_failed"] += 1
            self.problems.append(f"resume {path}: {exc!r}"[:300])


# ------------------------------------------------------------------------------------ tenants
def tenant_work(url: str, base: str, key: str, seed: int, steps: int) -> dict:
    sc = tinker.ServiceClient(base_url=url, api_key=key)
    tc = sc.create_lora_training_client(base_model=base, rank=RANK, seed=seed).result()
    losses, tokens, calls = [], [], 2
    for k in range(steps):
        losses.append(step(tc, seed * 100 + k))
        calls += 2
        if k % 2 == 1:
            path = tc.save_weights_for_sampler(f"s{k}").result().path
            out = (
                sc.create_sampling_client(model_path=path)
                .result()
                .sample(PROMPT, 2, GREEDY)
                .result()
            )
            tokens.append([s.tokens for s in out.sequences])
            calls += 3
    losses.append(loss(tc))
    state = tc.save_state("final").result().path
    external = tc.save_weights_external("final").result().path
    calls += 3
    return {
        "losses": losses,
        "tokens": tokens,
        "calls": calls,
        "state": state,
        "external": external,
        "sampler": path,
        "run": tc.model_id,
        "session": sc.holder.get_session_id(),
        "sampler_id": sc.create_sampling_client(model_path=path).result()._sampling_session_id,
        "key": key,
    }


def probes(url: str, me: str, victim: dict) -> list[tuple[str, bool]]:
    """(probe, refused) for every way ``me`` could reach ``victim``'s things. (Publishing, TTL
    changes and session reads are not served at all, for anyone, so they are no probe here.)"""
    rest = tinker.RestClient(base_url=url, api_key=me)
    sc = tinker.ServiceClient(base_url=url, api_key=me)
    state, sampler, run = victim["state"], victim["sampler"], victim["run"]

    def http_export() -> None:
        r = httpx.post(
            f"{url}/api/v1/trinity/export_peft",
            headers={"X-API-Key": me},
            json={"tinker_path": state, "directory": "stolen"},
        )
        r.raise_for_status()

    def post(route: str, payload: dict) -> httpx.Response:
        r = httpx.post(f"{url}/api/v1/{route}", headers={"X-API-Key": me}, json=payload)
        r.raise_for_status()
        return r

    def load_into_mine() -> None:
        """``load_weights`` into a model of one's own (the SDK's deprecated ``load_state``,
        sent as it sent it): refused at submission or as the future's failure."""
        mine = sc.create_lora_training_client(base_model=victim["base"], rank=RANK).result()
        request = {"model_id": mine.model_id, "seq_id": 1, "path": state, "optimizer": False}
        request_id = post("load_weights", request).json()["request_id"]
        while True:
            r = httpx.post(
                f"{url}/api/v1/retrieve_future",
                headers={"X-API-Key": me},
                json={"request_id": request_id},
            )
            if r.status_code != 408:  # 408: still running
                r.raise_for_status()
                break
        if "error" in r.json():
            raise RuntimeError(r.json()["error"])

    session = victim["session"]
    attempts = {
        "session_heartbeat": lambda: post("session_heartbeat", {"session_id": session}),
        "get_info": lambda: post("get_info", {"model_id": run}),
        "get_training_run": lambda: rest.get_training_run(run).result(),
        "run_by_path": lambda: rest.get_training_run_by_tinker_path(state).result(),
        "list_checkpoints": lambda: rest.list_checkpoints(run).result(),
        "weights_info": lambda: rest.get_weights_info_by_tinker_path(state).result(),
        "download_urls": lambda: rest.get_external_weights_urls(victim["external"]).result(),
        "get_sampler": lambda: rest.get_sampler(victim["sampler_id"]).result(),
        "create_from_state": lambda: sc.create_training_client_from_state(state).result(),
        "create_from_state_with_optimizer": lambda: (
            sc.create_training_client_from_state_with_optimizer(state).result()
        ),
        "load_state": load_into_mine,
        "sample_from_path": lambda: (
            sc.create_sampling_client(model_path=sampler)
            .result()
            .sample(PROMPT, 1, GREEDY)
            .result()
        ),
        "export_peft": http_export,
        "finish_session": lambda: post(f"sessions/{session}/finish", {"reason": None}),
        "delete": lambda: rest.delete_checkpoint_from_tinker_path(state).result(),
        "delete_sampler": lambda: rest.delete_checkpoint_from_tinker_path(sampler).result(),
    }
    mine = {c.tinker_path for c in rest.list_user_checkpoints(limit=10000).result().checkpoints}
    out = [("list_user_checkpoints", not ({state, sampler} & mine))]
    runs = {r.training_run_id for r in rest.list_training_runs(limit=10000).result().training_runs}
    out.append(("list_training_runs", run not in runs))
    for name, attempt in attempts.items():
        try:
            attempt()
            out.append((name, False))
        except Exception:  # noqa: BLE001 - any refusal counts; success is the failure
            out.append((name, True))
    return out


def tenant_campaign(model: Path, data_dir: Path, n: int, steps: int) -> dict:
    keys = {f"tml-tenant{i}": f"tenant{i}" for i in range(n)}
    srv = Server(model, data_dir, keys)
    srv.start()
    base = str(model)
    try:
        alone = [tenant_work(srv.url, base, k, i % 2 + 1, steps) for i, k in enumerate(keys)]
        with ThreadPoolExecutor(n) as pool:
            futs = [
                pool.submit(tenant_work, srv.url, base, k, i % 2 + 1, steps)
                for i, k in enumerate(keys)
            ]
            together, errors = [], 0
            for f in futs:
                try:
                    together.append(f.result())
                except Exception as exc:  # noqa: BLE001
                    errors += 1
                    print("tenant call failed:", repr(exc)[:300])
        max_diff, differ = 0.0, 0
        for a, b in zip(alone, together, strict=False):
            diff = float(np.max(np.abs(np.subtract(a["losses"], b["losses"]))))
            max_diff = max(max_diff, diff)
            differ += int(diff > 1e-4) + int(a["tokens"] != b["tokens"])
        tried = refused = 0
        leaks: list[str] = []
        for victim in together:
            victim["base"] = base
            for me in keys:
                if me == victim["key"]:
                    continue
                for name, ok in probes(srv.url, me, victim):
                    tried += 1
                    refused += ok
                    if not ok:
                        leaks.append(f"{me} -> {victim['key']}: {name}")
        intact = 0
        for victim in together:  # the refused deletes and TTLs really changed nothing
            sc = tinker.ServiceClient(base_url=srv.url, api_key=victim["key"])
            got = loss(sc.create_training_client_from_state(victim["state"]).result())
            sc.create_sampling_client(model_path=victim["sampler"]).result().sample(
                PROMPT, 1, GREEDY
            ).result()
            intact += int(abs(got - victim["losses"][-1]) < 1e-4)
        # the control: the owner's own key gets through the same probes (the deletes last)
        owner = together[0]
        control = sum(not refused for _, refused in probes(srv.url, owner["key"], owner))
    finally:
        srv.stop()
    return {
        "clients": n,
        "calls": sum(t["calls"] for t in alone + together),
        "errors": errors,
        "runs_differing_from_alone": differ,
        "max_loss_diff": max_diff,
        "probes": tried,
        "refused": refused,
        "leaks": leaks,
        "victims_intact": intact,
        "control_owner_allowed": f"{control}/{tried // (n * (n - 1))}",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="passes over the kill scenarios")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="training steps per tenant")
    parser.add_argument("--hang-s", type=float, default=120, help="bound on a pending future")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the summary here as JSON")
    args = parser.parse_args()

    from conftest import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="campaign-") as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "tiny-llama")
        t0 = time.monotonic()
        (work / "kill").mkdir()
        kc = KillCampaign(
            Server(model, work / "kill" / "data", {"tml-alice": "alice"}),
            "tml-alice",
            args.hang_s,
            random.Random(args.seed),
        )
        try:
            kill = kc.run(args.rounds)
        finally:
            kc.srv.stop()
        kill["problems"] = kc.problems
        (work / "tenants").mkdir()
        tenants = tenant_campaign(model, work / "tenants" / "data", args.tenants, args.steps)
        wall = time.monotonic() - t0

    summary = {"kill9": kill, "tenants": tenants, "wall_s": round(wall, 1)}
    rows = [
        ("kill -9 scenarios (kills)", f"{kill['scenarios']} ({kill['kills']})"),
        ("acknowledged checkpoints / lost", f"{kill['acked']} / {kill['lost']}"),
        (
            "futures pending at a kill: resolved / failed / hung",
            f"{kill['pending_resolved']} / {kill['pending_failed']} / {kill['hung']}",
        ),
        ("resumes ok / failed", f"{kill['resumed']} / {kill['resume_failed']}"),
        (
            "tenant clients, calls, errors",
            f"{tenants['clients']}, {tenants['calls']}, {tenants['errors']}",
        ),
        (
            "runs differing from alone (max loss diff)",
            f"{tenants['runs_differing_from_alone']} ({tenants['max_loss_diff']:.1e})",
        ),
        ("cross-tenant probes / refused", f"{tenants['probes']} / {tenants['refused']}"),
        ("victims intact after probes", f"{tenants['victims_intact']} / {tenants['clients']}"),
        ("control: probes the owner's own key gets through", tenants["control_owner_allowed"]),
    ]
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    for problem in kill["problems"] + tenants["leaks"]:
        print("PROBLEM:", problem)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    bad = kill["lost"] or kill["hung"] or kill["resume_failed"] or tenants["errors"]
    bad = bad or tenants["leaks"] or tenants["runs_differing_from_alone"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
