"""Ray or one process: the launcher's choice, and the actors a Ray run starts.

Ray is used when a cluster is reachable: ``RAY_ADDRESS``, ``cluster.ray_address`` other than
"auto", a running ``ray start --head`` cluster (the address file it leaves), or a Ray connection
this process already has (tests, notebooks); another program's own ``ray.init()`` cluster is not
joined. Otherwise the run stays in one
process, as before. Addresses are probed with a short TCP connect first: ``ray.init`` waits most
of a minute on an address nobody answers (a stale ``ray_current_cluster`` file, say).

Only the explorer spreads out. The workflow runners (``engine_num x runner_per_model``) become
actors, and on the local backend so do the ``engine_num`` rollout models, in a placement group of
one bundle each (a GPU each when ``cluster.gpu_per_node`` is set, else a CPU), spread over the
nodes. The trainer and the experience buffer stay in the driver (see ``trinity.explorer.runners``).
Actors get API keys, the Tinker endpoint, plugin dirs and ``explorer.env_vars`` through their
runtime env, so nothing needs exporting before ``ray start``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import os
import socket
from typing import Any

from trinity.config import ConfigError
from trinity.engine.process import ENV_VAR as THREADS_ENV_VAR
from trinity.plugins import ENV_VAR as PLUGIN_ENV_VAR
from trinity.plugins import loaded_plugin_dirs

log = logging.getLogger("trinity")

FORWARDED_ENV = (
    "TRINITY_API_KEY",
    "TINKER_API_KEY",
    "TINKER_BASE_URL",
    "TRINITY_LOG_LEVEL",
    THREADS_ENV_VAR,
)
PLACEMENT_TIMEOUT_S = 120.0


def connect(config: Any, *, explore: bool) -> RayCluster | None:
    """Connect to a reachable Ray cluster (``None``: run in this process); logs the choice."""
    cluster, reason = _connect(config) if explore else (None, "no explorer in this mode")
    log.info("%s: %s", "Ray mode" if cluster else "in-process mode", reason)
    return cluster


def _connect(config: Any) -> tuple[RayCluster | None, str]:
    if importlib.util.find_spec("ray") is None:
        return None, "ray is not installed (pip install 'trinity[ray]')"
    import ray

    if ray.is_initialized():
        return RayCluster(config, owned=False), "this process is already connected to Ray"
    explicit = os.environ.get("RAY_ADDRESS") or (
        config.cluster.ray_address if config.cluster.ray_address != "auto" else None
    )
    if explicit:
        where = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "cluster.ray_address"
        if explicit.startswith("ray://") or _answers(explicit):
            ray.init(address=explicit, namespace=_namespace(config))
            return RayCluster(config, owned=True), f"cluster at {explicit} ({where})"
        raise ConfigError(f"{where}: no Ray cluster answers at {explicit}")
    from ray._private.services import find_bootstrap_address

    # the address `ray start --head` leaves; not Ray's legacy scan for any GCS process on the
    # machine, which would join another program's private `ray.init()` cluster
    address = find_bootstrap_address(None)
    if address is None:
        return None, "no Ray cluster found (start one with `ray start --head`, or set RAY_ADDRESS)"
    if not _answers(address):
        return None, f"no Ray cluster answers at {address}, the last one started here"
    ray.init(address=address, namespace=_namespace(config))
    return RayCluster(config, owned=True), f"found the running cluster at {address}"


def _answers(address: str, timeout: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _namespace(config: Any) -> str:
    return f"{config.project}/{config.group}/{config.name}"


def runner_env(config: Any, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every actor: credentials and endpoint, plugin dirs, explorer.env_vars."""
    env = {key: os.environ[key] for key in FORWARDED_ENV if os.environ.get(key)}
    dirs = [str(d) for d in loaded_plugin_dirs() if d.is_dir()]
    if dirs:
        env[PLUGIN_ENV_VAR] = os.pathsep.join(dirs)
    env.update({key: str(value) for key, value in config.explorer.env_vars.items()})
    env.update(extra or {})
    return env


class RayCluster:
    """The connection and every actor this run starts on it; ``close`` removes them all."""

    def __init__(self, config: Any, *, owned: bool):
        self.config = config
        self.owned = owned  # we called ray.init, so we disconnect at the end
        self.actors: list[Any] = []
        self.pools: list[Any] = []
        self.groups: list[Any] = []

    async def rollout_models(
        self,
        model_path: str,
        env: dict[str, str],
        rope: dict | None = None,
        count: int | None = None,
    ) -> Any:
        """``count`` (default ``engine_num``) engine actors, one placement-group bundle each,
        spread over nodes (an auxiliary model's own, too)."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from trinity.backends.ray_actors import RolloutModel, RolloutModels

        count = count or self.config.explorer.rollout_model.engine_num
        bundle = self._bundle()
        group = placement_group([bundle] * count, strategy="SPREAD")
        self.groups.append(group)
        try:
            await asyncio.wait_for(group.ready(), PLACEMENT_TIMEOUT_S)
        except TimeoutError:
            raise ConfigError(
                f"cannot place {count} rollout model(s) of {bundle} on the Ray cluster "
                f"(it has {ray.available_resources()}); lower the engine_num of "
                "explorer.rollout_model / auxiliary_models or add nodes"
            ) from None
        actor_cls = ray.remote(RolloutModel)
        # each engine its share of its node's cores (Ray alone would give it OMP_NUM_THREADS=1)
        env = {THREADS_ENV_VAR: str(self.actor_threads()), **env}
        models = [
            actor_cls.options(
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, index),
                runtime_env={"env_vars": env},
                max_restarts=3,
                max_task_retries=3,
            ).remote(model_path, rope)
            for index in range(count)
        ]
        self.actors += models
        return RolloutModels(models, await models[0].tokenizer.remote())

    def actors_per_node(self) -> int:
        """Rollout-model actors on the busiest node (placed SPREAD over the alive nodes)."""
        import ray

        nodes = max(1, sum(1 for node in ray.nodes() if node["Alive"]))
        return math.ceil(self.config.explorer.rollout_model.engine_num / nodes)

    def actor_threads(self) -> int:
        """Compute threads of one rollout model: the smallest node's cores shared by its actors
        and the driver (which trains)."""
        import ray

        cores = [int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n["Alive"]] or [1]
        return max(1, min(cores) // (self.actors_per_node() + 1))

    def _bundle(self) -> dict[str, float]:
        import ray

        cluster = self.config.cluster
        nodes = [node for node in ray.nodes() if node["Alive"]]
        if cluster.node_num and len(nodes) < cluster.node_num:
            raise ConfigError(
                f"cluster.node_num is {cluster.node_num} but the Ray cluster has {len(nodes)} "
                "node(s)"
            )
        if not cluster.gpu_per_node:
            return {"CPU": 1}
        return {"CPU": 1, "GPU": self.config.explorer.rollout_model.tensor_parallel_size}

    async def runner_pool(
        self,
        backend: Any,
        sampler: Any,
        settings: Any,
        env: dict[str, str],
        auxiliary: list[tuple[Any, Any]] | None = None,
    ) -> Any:
        """``engine_num x runner_per_model`` runner actors, spread over the nodes, all started;
        ``auxiliary``: (recipe, settings) of each auxiliary model."""
        from trinity.explorer.runners import RunnerPool

        explorer = self.config.explorer
        pool = RunnerPool(
            explorer.rollout_model.engine_num * explorer.runner_per_model,
            backend,
            sampler,
            settings,
            # num_cpus=0 as in the original: runners mostly wait on the model or a judge
            options={
                "num_cpus": 0,
                "scheduling_strategy": "SPREAD",
                "runtime_env": {"env_vars": env},
            },
            auxiliary=auxiliary or [],
        )
        self.pools.append(pool)
        await pool.wait_ready()
        return pool

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for pool in self.pools:
            pool.close()
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        for group in self.groups:
            remove_placement_group(group)
        if self.owned:
            ray.shutdown()
