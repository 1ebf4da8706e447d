"""What one process talks to, built from the validated config: the local engine, Ray rollout
actors, or a Tinker service (Thinking Machines', a team's own ``trinity server``, or one started
for this run with ``model.tinker.base_url: local``)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trinity.algorithms import build_loss_plan
from trinity.backends.local import LocalRuntime, LocalSampler, LocalTrainer
from trinity.backends.ray_actors import TinkerSamplers
from trinity.backends.tinker_sdk import TinkerSampler, TinkerSession, TinkerTrainer
from trinity.explorer.sampler import AuxiliaryModel, RolloutSettings
from trinity.jobdir import JobDir
from trinity.launcher.cluster import RayCluster, runner_env

log = logging.getLogger("trinity")

LOCAL_SERVER = "local"  # model.tinker.base_url value: start `trinity server` for this run


def check_credentials(config: Any) -> None:
    """The Tinker backend needs an API key unless this run starts its own server."""
    from trinity.config import ConfigError

    tinker_cfg = config.model.tinker
    if not tinker_cfg.enable or _base_url(config) == LOCAL_SERVER:
        return
    if not _api_key():
        raise ConfigError(
            "model.tinker.enable: set TRINITY_API_KEY or TINKER_API_KEY for the Tinker service "
            f"(or model.tinker.base_url: {LOCAL_SERVER} to serve the model on this machine)"
        )


def _base_url(config: Any) -> str | None:
    return config.model.tinker.base_url or os.environ.get("TINKER_BASE_URL")


def _api_key() -> str | None:
    return os.environ.get("TRINITY_API_KEY") or os.environ.get("TINKER_API_KEY")


@dataclass
class Backends:
    """What one process talks to: a trainer and/or a sampler, and how to close them."""

    trainer: Any = None
    sampler: Any = None
    ref_sampler: Any = None
    tokenizer: Any = None
    auxiliary: list[AuxiliaryModel] = field(default_factory=list)  # explorer.auxiliary_models
    closers: list = field(default_factory=list)

    session: Any = None  # a TinkerSession, told at the end how the run went
    runners: Any = None  # Ray mode: the RunnerPool the explorer's workflows run on

    async def close(self, error: BaseException | None = None) -> None:
        if self.session is not None:  # first: an embedded server is among the closers
            status = "success" if error is None else "errored"
            if isinstance(error, KeyboardInterrupt | asyncio.CancelledError):
                status = "interrupted"
            await self.session.close(status, None if error is None else repr(error)[:500])
        for close in reversed(self.closers):
            result = close()
            if asyncio.iscoroutine(result):
                await result


def _lora_spec(config: Any) -> Any:
    from trinity.engine import LoraSpec

    tinker_cfg = config.model.tinker
    if tinker_cfg.enable or not config.model.lora_configs:
        return LoraSpec(
            rank=tinker_cfg.rank,
            seed=tinker_cfg.seed,
            train_mlp=tinker_cfg.train_mlp,
            train_attn=tinker_cfg.train_attn,
            train_unembed=tinker_cfg.train_unembed,
        )
    lora = config.model.lora_configs[0]
    exclude = lora.exclude_modules
    return LoraSpec(
        rank=lora.lora_rank,
        alpha=lora.lora_alpha,
        seed=tinker_cfg.seed,
        exclude_modules=exclude if isinstance(exclude, str | None) else tuple(exclude),
    )


def _rope(config: Any) -> dict:
    """The original's ``model.rope_scaling`` / ``model.rope_theta``, for the local engines."""
    model = config.model
    return {"rope_scaling": model.rope_scaling, "rope_theta": model.rope_theta}


async def build_backends(
    config: Any,
    *,
    explore: bool,
    train: bool,
    resume_ref: str | None,
    cluster: RayCluster | None = None,
    server_dir: Path | None = None,
) -> Backends:
    """With ``cluster``, the explorer's sampling happens on Ray actors (``backends.runners``);
    ``server_dir``: the store of a ``base_url: local`` server (default: the run's)."""
    from trinity.engine.demo_model import resolve_model_path

    backends = Backends()
    tinker_cfg = config.model.tinker
    plan = build_loss_plan(config.algorithm)
    needs_reference = plan.needs_reference
    remote = explore and cluster is not None
    if not tinker_cfg.enable:
        model_path = str(resolve_model_path(config.model.model_path))
        if train or not remote:
            runtime = LocalRuntime(model_path, rope=_rope(config))
            backends.closers.append(runtime.close)
            backends.tokenizer = runtime.tokenizer
        if train:
            # rollout model actors load published weights from disk, as another process would
            backends.trainer = LocalTrainer(
                runtime, "policy", _lora_spec(config), persist_samplers=remote or not explore
            )
            lora_path = config.model.lora_configs and config.model.lora_configs[0].path
            if resume_ref:
                await backends.trainer.load_state(resume_ref)
            elif lora_path:
                await backends.trainer.load_adapter(lora_path)
            if needs_reference:
                backends.ref_sampler = LocalSampler(runtime)
        if remote:  # the auxiliary models are engine actors too, which the runners sample
            env = runner_env(config)
            backends.sampler = await cluster.rollout_models(model_path, env, _rope(config))
            backends.tokenizer = backends.sampler.tokenizer
            auxiliary = [
                (
                    await cluster.rollout_models(
                        str(resolve_model_path(aux.model_path)), env, count=aux.engine_num
                    ),
                    auxiliary_settings(config, aux),
                )
                for aux in config.explorer.auxiliary_models
            ]
            backends.runners = await cluster.runner_pool(
                backends.sampler, backends.sampler, rollout_settings(config), env, auxiliary
            )
            return backends
        if explore:
            backends.sampler = LocalSampler(runtime)
        for aux in config.explorer.auxiliary_models if explore else []:
            aux_runtime = LocalRuntime(str(resolve_model_path(aux.model_path)))
            backends.closers.append(aux_runtime.close)
            backends.auxiliary.append(
                AuxiliaryModel(LocalSampler(aux_runtime), auxiliary_settings(config, aux))
            )
        return backends

    base_url, api_key = _base_url(config), _api_key()
    base_model = tinker_cfg.base_model or config.model.model_path
    aux_models = [aux.model_path for aux in config.explorer.auxiliary_models] if explore else []
    if base_url == LOCAL_SERVER:
        base_url, api_key, (base_model, *aux_models) = _start_local_server(
            config, backends, aux_models, server_dir
        )
    session = TinkerSession(base_url, api_key)
    backends.session = session
    if train and plan.settings.entropy_coef and not session.exact_entropy:
        log.warning(
            "entropy_coef=%s on Thinking Machines' hosted service: the entropy term and metric "
            "are estimated from the sampled tokens (-log p of each), not exact over the vocabulary",
            plan.settings.entropy_coef,
        )
    await asyncio.to_thread(session.check_model, base_model)
    if train:
        if resume_ref:
            backends.trainer = await TinkerTrainer.from_state(session, resume_ref)
        else:
            backends.trainer = await TinkerTrainer.create(
                session,
                base_model,
                rank=tinker_cfg.rank,
                seed=tinker_cfg.seed,
                train_mlp=tinker_cfg.train_mlp,
                train_attn=tinker_cfg.train_attn,
                train_unembed=tinker_cfg.train_unembed,
            )
        backends.tokenizer = backends.trainer.tokenizer
        if needs_reference:
            backends.ref_sampler = await TinkerSampler.create(session, base_model)
    if explore:
        backends.sampler = await TinkerSampler.create(session, base_model)
        backends.tokenizer = backends.sampler.tokenizer
    for aux, aux_model in zip(config.explorer.auxiliary_models, aux_models, strict=False):
        await asyncio.to_thread(session.check_model, aux_model)
        backends.auxiliary.append(
            AuxiliaryModel(
                await TinkerSampler.create(session, aux_model), auxiliary_settings(config, aux)
            )
        )
    if remote:  # each runner opens its own session, with this run's endpoint and key
        endpoint = {
            "TRINITY_API_KEY": api_key,
            **({"TINKER_BASE_URL": base_url} if base_url else {}),
        }
        auxiliary = [
            (TinkerSamplers(aux_model), auxiliary_settings(config, aux))
            for aux, aux_model in zip(config.explorer.auxiliary_models, aux_models, strict=True)
        ]
        backends.runners = await cluster.runner_pool(
            TinkerSamplers(base_model),
            backends.sampler,
            rollout_settings(config),
            runner_env(config, endpoint),
            auxiliary,
        )
    return backends


def _start_local_server(
    config: Any, backends: Backends, auxiliary: list[str], server_dir: Path | None = None
) -> tuple[str, str, list[str]]:
    """``base_url: local``: serve the model (and the ``auxiliary`` ones) with ``trinity server``
    on a loopback port; returns its URL, API key and the models' names there."""
    from trinity.engine.demo_model import resolve_model_path
    from trinity.server import build_service
    from trinity.server.runner import ServerThread

    policy = config.model.tinker.base_model or config.model.model_path
    paths = [str(resolve_model_path(path)) for path in [policy, *auxiliary]]
    api_key = f"tml-{secrets.token_hex(16)}"
    service = build_service(
        list(dict.fromkeys(paths)),
        server_dir or JobDir(config.checkpoint_job_dir).server_dir,
        f"{api_key}=local",
    )
    server = ServerThread(service).start()
    backends.closers.append(server.stop)
    log.info("started trinity server for this run at %s (models %s)", server.url, paths)
    return server.url, api_key, [str(Path(path).resolve()) for path in paths]


def build_critic(
    config: Any, total_steps: int | None, tokenizer: Any, start: str | None = None
) -> Any:
    """PPO's critic (trinity/trainer/critic.py) for an algorithm that has one, else None: a value
    model over ``start`` (a stage's start or a resumed critic's base), by default over
    ``model.critic_model_path``, in this process, whatever backend trains the policy
    (docs/algorithms.md, "PPO and its critic")."""
    from trinity.algorithms import adam_params_fn, resolve_algorithm
    from trinity.config import ConfigError
    from trinity.config.critic import critic_config, optimizer_section
    from trinity.engine.value_head import ValueModel
    from trinity.trainer.critic import Critic

    algorithm = resolve_algorithm(config.algorithm)
    if not algorithm.use_critic:
        return None
    settings = critic_config(config.trainer.trainer_config)
    lora, rank = _lora_spec(config), settings.model.lora_rank
    if rank == 0:
        lora = None
    elif rank is not None:
        alpha = settings.model.lora_alpha or lora.alpha
        lora = dataclasses.replace(lora, rank=rank, alpha=alpha)
    path = start or config.model.critic_model_path or config.model.model_path
    model = ValueModel(path, lora, seed=config.model.tinker.seed or 0)
    if tokenizer is not None and model.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"model.critic_model_path: '{path}' has another tokenizer than the policy; the critic "
            "values the policy's token ids, so it needs the same vocabulary"
        )
    grad_clip = config.trainer.grad_clip if settings.grad_clip is None else settings.grad_clip
    return Critic(
        model,
        algorithm,
        adam_params_fn(optimizer_section(settings), total_steps, grad_clip),
        cliprange_value=settings.cliprange_value,
        ppo_epochs=settings.ppo_epochs,
        loss_agg_mode=settings.loss_agg_mode,
    )


def merged_start(config: Any, ref: str, server_dir: Path | None, output: Path) -> str | None:
    """The weights at ``ref`` (a stage's start: the previous stage's last checkpoint) written to
    ``output`` as a merged Hugging Face model for the critic to start from; None, with a warning,
    where they live only on a hosted Tinker service."""
    import torch

    from trinity.engine import Engine

    source: Path | None = Path(ref)
    if ref.startswith("tinker://"):
        from trinity.server.checkpoints import stored_directory

        source = stored_directory(server_dir, ref) if server_dir else None
    if source is None:
        log.warning(
            "the critic starts from model.critic_model_path, not the previous stage's weights: "
            "%s is on the Tinker service, whose value-less API cannot lend them to it",
            ref,
        )
        return None
    engine = Engine(config.model.model_path, device="cpu", dtype=torch.float32)
    engine.export_checkpoint(str(source), "hf", str(output))
    log.info("the critic starts from the previous stage's weights %s (%s)", ref, output)
    return str(output)


def critic_base(directory: Path) -> str | None:
    """The model a saved critic was built over (its LoRA and head only fit that one); None for a
    checkpoint that does not record it."""
    from trinity.engine.checkpoint import read_state_meta

    base = read_state_meta(directory).get("base_model")
    return base if base and base != "critic" else None


def chat_template(config: Any) -> str | None:
    model = config.model
    if model.custom_chat_template is None and model.chat_template_path:
        return Path(model.chat_template_path).read_text()
    return model.custom_chat_template


def auxiliary_settings(config: Any, aux: Any) -> RolloutSettings:
    """An auxiliary model samples as ``model.*`` says, except for the lengths its entry sets;
    it renders chats with its own template (or the entry's), never the policy's."""
    base, model = rollout_settings(config), config.model
    return dataclasses.replace(
        base,
        max_model_len=aux.max_model_len or model.max_model_len,
        max_prompt_tokens=aux.max_prompt_tokens or model.max_prompt_tokens,
        max_response_tokens=aux.max_response_tokens or model.max_response_tokens,
        chat_template=aux.chat_template,
        enable_thinking=aux.enable_thinking,
        enable_auto_tool_choice=aux.enable_auto_tool_choice,
        tool_call_parser=aux.tool_call_parser,
        reasoning_parser=aux.reasoning_parser,
    )


def rollout_settings(config: Any) -> RolloutSettings:
    model, rollout = config.model, config.explorer.rollout_model
    template = chat_template(config)
    return RolloutSettings(
        max_prompt_tokens=model.max_prompt_tokens,
        max_response_tokens=model.max_response_tokens,
        temperature=model.temperature,
        top_p=model.top_p,
        top_k=model.top_k,
        enable_prompt_truncation=model.enable_prompt_truncation,
        chat_template=template,
        enable_thinking=model.enable_thinking
        if rollout.enable_thinking is None
        else rollout.enable_thinking,
        max_model_len=model.max_model_len,
        enable_history=rollout.enable_history,
        enable_openai_api=rollout.enable_openai_api,
        enable_auto_tool_choice=rollout.enable_auto_tool_choice,
        tool_call_parser=rollout.tool_call_parser,
        reasoning_parser=rollout.reasoning_parser,
    )
