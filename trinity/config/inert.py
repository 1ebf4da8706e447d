"""Keys of the original's schema that do nothing here, so that none is ignored in silence.

Drop-in means a config written for Trinity-RFT 0.6 loads unchanged; the promise that comes with it
is that every key either does what it does there, or is named, with the reason, in one warning
when the config is loaded (``trinity run`` and ``trinity config check`` alike). A key is named
when the YAML sets it to anything but its *harmless* values, the values at which the original
behaves as this implementation does (``enable_log_requests: false``, ``repetition_penalty: 1.0``).
Settings of GPU engines (vLLM, veRL, Megatron) can never mean anything on these backends. The
``NOT_YET`` entries could, but are not implemented: set to anything but a harmless value they are
refused at config check (``not_implemented``) rather than warned about, since a run without the
feature the user asked for is not the run they asked for; they leave this table as they land.
Keys the original ignores too (``optimizer.clip_grad``, ``synchronizer.wait_for_checkpoint``) or
that only serve a feature refused at validation (DPO's keys) behave as there: not listed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from trinity.config.critic import VERL_SECTIONS

GPU_ROLLOUT = "vLLM/SGLang tuning (rollouts run on the run's backend)"
GPU_TRAINER = "veRL/FSDP/Megatron tuning (training runs on the run's backend)"
NOT_YET = "not implemented yet"
NO_TOP_K = "top-k logprobs are not returned"


@dataclass(frozen=True)
class Inert:
    why: str
    harmless: tuple[Any, ...] = ()


_TASKSET = {
    "format.prompt_type": Inert("prompts are always chat messages", ("messages",)),
    "format.tools_key": Inert(NOT_YET, ("tools",)),
    "format.chat_template": Inert("use model.custom_chat_template"),
    "format.enable_thinking": Inert(NOT_YET),
    "rollout_args.logprobs": Inert(NO_TOP_K, (0,)),
    "rollout_args.n": Inert("n is algorithm.repeat_times"),
    "task_selector": Inert("deprecated: use data_selector"),
}
# an inline veRL config: only the critic's section acts (trinity/config/critic.py)
_VERL_SECTIONS = tuple(section for section in VERL_SECTIONS if section != "critic")
_SET_HERE = "set from the rest of the config, as in the original"
_CRITIC = {
    **{
        key: Inert(GPU_TRAINER)
        for key in (
            "strategy",
            "ppo_micro_batch_size",
            "ppo_micro_batch_size_per_gpu",
            "forward_micro_batch_size",
            "forward_micro_batch_size_per_gpu",
            "use_dynamic_bsz",
            "ppo_max_token_len_per_gpu",
            "forward_max_token_len_per_gpu",
            "ulysses_sequence_parallel_size",
            "checkpoint",
            "megatron",
            "profile",
            "profiler",
            "load_weight",
            "nccl_timeout",
            "data_loader_seed",
            "model.override_config",
            "model.external_lib",
            "model.enable_gradient_checkpointing",
            "model.use_remove_padding",
            "model.fsdp_config",
            "optim.optimizer_impl",
            "optim.lr_warmup_init",
            "optim.lr_decay_steps",
            "optim.lr_decay_style",
            "optim.min_lr",
            "optim.weight_decay_incr_style",
            "optim.lr_wsd_decay_style",
            "optim.lr_wsd_decay_steps",
            "optim.use_checkpoint_opt_param_scheduler",
            "optim.override_optimizer_config",
        )
    },
    **{
        key: Inert(_SET_HERE)
        for key in (
            "enable",
            "ppo_mini_batch_size",
            "rollout_n",
            "ray_namespace",
            "model.path",
            "model.tokenizer_path",
            "optim.total_training_steps",
        )
    },
    "optim.optimizer": Inert("the optimizer is AdamW", ("adam", "adamw")),
    "model.trust_remote_code": Inert("models load without remote code", (False,)),
    "model.rope_scaling": Inert(NOT_YET),
    "model.rope_theta": Inert(NOT_YET),
}
_ROLLOUT_MODEL = {
    "engine_type": Inert(NOT_YET, ("vllm", "sglang", "tinker")),
    "data_parallel_size": Inert(GPU_ROLLOUT),
    "pipeline_parallel_size": Inert(GPU_ROLLOUT),
    "enable_expert_parallel": Inert(GPU_ROLLOUT),
    "extra_engine_args": Inert(GPU_ROLLOUT),
    "use_v1": Inert(GPU_ROLLOUT),
    "enforce_eager": Inert(GPU_ROLLOUT),
    "enable_prefix_caching": Inert(GPU_ROLLOUT),
    "enable_chunked_prefill": Inert(GPU_ROLLOUT),
    "gpu_memory_utilization": Inert(GPU_ROLLOUT),
    "dtype": Inert("the engine picks the dtype the hardware computes natively"),
    "weight_sync_buffer_size": Inert(GPU_ROLLOUT),
    "max_model_len": Inert("use model.max_model_len"),
    "max_prompt_tokens": Inert("use model.max_prompt_tokens"),
    "max_response_tokens": Inert("use model.max_response_tokens"),
    "chat_template": Inert("use model.custom_chat_template"),
    "enable_log_requests": Inert(NOT_YET, (False,)),
    "base_port": Inert(NOT_YET),
    "api_key": Inert(NOT_YET, ("EMPTY",)),
}
# what an auxiliary model takes from its own entry (model.* is for the rollout model)
_AUXILIARY_OWN = ("max_model_len", "max_prompt_tokens", "max_response_tokens", "chat_template")

INERT: dict[str, Inert] = {
    "ray_namespace": Inert("Ray actors are named by the run", ("",)),
    "ignore_validator_suggestions": Inert("the GPU memory advisor has nothing to advise", (False,)),
    "data_processor.experience_pipeline.input_save_path": Inert(
        "explorer output is kept in monitor/rollouts.db (monitor.max_rollouts)"
    ),
    "data_processor.experience_pipeline.inputs": Inert(NOT_YET, ({},)),
    "service": Inert(NOT_YET, ({},)),
    "algorithm.optimizer.optimizer_type": Inert("the optimizer is AdamW", ("adam", "adamw")),
    "algorithm.enable_router_replay": Inert("MoE router replay (veRL)", (False,)),
    "algorithm.bypass_old_logprobs": Inert("the sampler's logprobs are always pi_old", (True,)),
    "algorithm.rollout_correction": Inert(NOT_YET),
    "model.trust_remote_code": Inert("models load without remote code", (False,)),
    "model.logprobs": Inert(NO_TOP_K, (0,)),
    "model.min_response_tokens": Inert(NOT_YET, (0,)),
    "model.repetition_penalty": Inert(NOT_YET, (1.0,)),
    "model.lora_configs[*].name": Inert("there is one adapter; its name is the run's"),
    "model.lora_configs[*].base_model_name": Inert("the base model is model.model_path"),
    "model.lora_configs[*].lora_dtype": Inert(GPU_TRAINER, ("auto",)),
    "model.lora_configs[*].target_modules": Inert(
        "adapters go on every linear layer", ("all-linear",)
    ),
    "model.fully_sharded_loras": Inert(GPU_ROLLOUT, (False,)),
    "model.max_cpu_loras": Inert(GPU_ROLLOUT),
    "model.external_model.enable": Inert(NOT_YET, (False,)),
    **{f"buffer.explorer_input.taskset.{k}": v for k, v in _TASKSET.items()},
    **{f"buffer.explorer_input.tasksets[*].{k}": v for k, v in _TASKSET.items()},
    **{f"buffer.explorer_input.eval_tasksets[*].{k}": v for k, v in _TASKSET.items()},
    "explorer.runner_prepare_concurrency": Inert("runners need no preparation", (8,)),
    "explorer.runner_prepare_max_retries": Inert("runners need no preparation", (2,)),
    **{f"explorer.rollout_model.{k}": v for k, v in _ROLLOUT_MODEL.items()},
    **{
        f"explorer.auxiliary_models[*].{k}": v
        for k, v in _ROLLOUT_MODEL.items()
        if k not in _AUXILIARY_OWN
    },
    "explorer.min_running_model_num": Inert("serve: one sampler, drained to switch", (1,)),
    "explorer.db_url": Inert("serve: unrated completions are kept in memory"),
    "explorer.runner_state_report_interval": Inert(NOT_YET, (0,)),
    "trainer.trainer_strategy": Inert(GPU_TRAINER),
    "trainer.enable_preview": Inert(NOT_YET, (False,)),
    "trainer.use_dynamic_bsz": Inert(GPU_TRAINER),
    "trainer.use_remove_padding": Inert(GPU_TRAINER),
    "trainer.balance_batch": Inert(GPU_TRAINER),
    "trainer.max_token_len_per_gpu": Inert(GPU_TRAINER),
    "trainer.ulysses_sequence_parallel_size": Inert(GPU_TRAINER),
    "trainer.fix_actor_microbatch_loss_scale": Inert(GPU_TRAINER, (False,)),
    "trainer.param_offload": Inert(GPU_TRAINER),
    "trainer.optimizer_offload": Inert(GPU_TRAINER),
    "trainer.grad_offload": Inert(GPU_TRAINER),
    "trainer.offload_policy": Inert(GPU_TRAINER),
    "trainer.save_strategy": Inert(GPU_TRAINER),
    "trainer.megatron": Inert(GPU_TRAINER),
    **{f"trainer.trainer_config.{k}": Inert(GPU_TRAINER) for k in _VERL_SECTIONS},
    **{f"trainer.trainer_config.critic.{k}": v for k, v in _CRITIC.items()},
    "monitor.detailed_stats": Inert(NOT_YET, (False,)),
    "monitor.enable_ray_timeline": Inert(NOT_YET, (False,)),
    "synchronizer.group_name": Inert(
        "the NCCL group's name (weights never travel by NCCL here)", ("rollout_weight_sync",)
    ),
    "log.group_by_node": Inert(NOT_YET, (False,)),
}
_INDEX = re.compile(r"\[\d+\]")
_STAGE = re.compile(r"^stages\[\*\]\.")


def inert_keys(present: Any, resolved: Any) -> list[tuple[str, str]]:
    """(key path, why) for each key the YAML sets (``present``: its mapping) that does nothing
    here, judged by its value in ``resolved`` (the same keys, interpolations resolved); stage
    sections are matched like the top-level ones."""
    return list(_walk(present, resolved, ""))


def _walk(present: Any, value: Any, path: str) -> Iterator[tuple[str, str]]:
    entry = INERT.get(_STAGE.sub("", _INDEX.sub("[*]", path)))
    if entry is not None:
        if value is not None and not _harmless(value, entry.harmless):
            yield path, entry.why
        return
    if isinstance(present, dict) and isinstance(value, dict):
        for key, item in present.items():
            yield from _walk(item, value.get(key), f"{path}.{key}" if path else str(key))
    elif isinstance(present, list) and isinstance(value, list):
        for index, (item, resolved_item) in enumerate(zip(present, value, strict=False)):
            yield from _walk(item, resolved_item, f"{path}[{index}]")


def _harmless(value: Any, harmless: tuple[Any, ...]) -> bool:
    return any(_same(value, choice) for choice in harmless)


def _same(a: Any, b: Any) -> bool:
    """Equal, but a boolean only equals a boolean (``False == 0`` in Python)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, str) and isinstance(b, str):
        return a.strip().lower() == b.lower()
    return a == b


def not_implemented(keys: list[tuple[str, str]]) -> str | None:
    """One line refusing the keys of ``keys`` that could act here but do not yet; None if none."""
    paths = [path for path, why in keys if why == NOT_YET]
    if not paths:
        return None
    return (
        f"{', '.join(paths)}: not implemented in this implementation (remove the key(s) or set "
        "them to the original's default)"
    )


def inert_warning(keys: list[tuple[str, str]]) -> str:
    """One line naming every inert key, grouped by reason."""
    by_reason: dict[str, list[str]] = {}
    for path, why in keys:
        by_reason.setdefault(why, []).append(path)
    groups = "; ".join(f"{why}: {', '.join(paths)}" for why, paths in by_reason.items())
    return f"{len(keys)} config key(s) set here do nothing in this implementation: {groups}"
