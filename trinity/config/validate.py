"""Combination checks and derived values, in the spirit of the original's validators.

Runs on the typed ``Config`` after OmegaConf has merged and resolved it. Each check raises a
one-line ``ConfigError`` that says which key is wrong and why; each derivation writes its value
back so ``trinity run --dry-run`` shows what the run will use. Names (algorithms, workflows,
rewards, builtin tasksets, monitors) are checked against the registries of the ``trinity.registry``
leaf, so plugins loaded before validation count and the config layer imports no layer above it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

from trinity.config.errors import ConfigError, did_you_mean
from trinity.config.schema import Config, TasksetConfig
from trinity.registry import (
    ADVANTAGE_FNS,
    ALGORITHMS,
    BATCH_ADVANTAGE_FNS,
    BUILTIN_TASKSETS,
    EXPERIENCE_OPERATORS,
    KL_FNS,
    LOSS_AGG_MODES,
    MONITORS,
    POLICY_LOSSES,
    REWARD_FUNCTIONS,
    TASK_OPERATORS,
    WORKFLOWS,
    Registry,
)

log = logging.getLogger("trinity.config")

MODES = ("both", "explore", "train", "bench", "serve", "colocate")
SYNC_METHODS = ("nccl", "checkpoint", "memory")
SYNC_METHOD_ALIASES = {"online": "nccl", "offline": "checkpoint"}
SYNC_STYLES = ("fixed", "explorer_driven", "trainer_driven", "fully_async")
SYNC_STYLE_ALIASES = {
    "dynamic_by_explorer": "explorer_driven",
    "dynamic_by_trainer": "trainer_driven",
}
LR_SCHEDULERS = ("constant", "cosine")
# the replay buffer's priority functions and their args (trinity.buffer.experience.ReplayBuffer)
PRIORITY_FNS = {
    "linear_decay": ("decay",),
    "linear_decay_use_count_control_randomization": ("decay", "use_count_limit", "sigma"),
}
PRIORITY_FN_ALIASES = {"decay_limit_randomization": "linear_decay_use_count_control_randomization"}
SAMPLE_STRATEGIES = ("default", "warmup", "staleness_control", "mix")
# each strategy's args with the original's defaults (trinity.buffer.strategies applies them)
SAMPLE_STRATEGY_ARGS: dict[str, dict[str, Any]] = {
    "default": {},
    "warmup": {},
    "staleness_control": {"max_staleness": float("inf")},
    "mix": {"expert_data_ratio": 0.5, "sft_dataset_name": "sft_dataset"},
}
ENTROPY_LOSS_FNS = ("default", "mix", "none")
TASKSET_STORAGE = ("file", "sql")
EXPERIENCE_STORAGE = ("queue", "sqlite", "sql", "file")
SELECTORS = ("sequential", "shuffle", "random", "offline_easy2hard", "difficulty_based")
# difficulty_based's kwargs (trinity.buffer.selectors.DIFFICULTY_KWARGS holds their defaults)
DIFFICULTY_KWARGS = ("m", "lamb", "rho", "adaptive_rho", "do_sample", "target_reward", "tau")
PROMPT_TYPES = ("messages", "plaintext")
CONCURRENT_MODES = ("sequential", "asynchronous", "multi-threading")
NO_MONITOR = ("none", "null", "off", "")
# vLLM's <think> reasoning parsers (trinity.explorer.openai_api.split_reasoning)
REASONING_PARSERS = ("deepseek_r1", "qwen3")
SAVE_HF_CHECKPOINT = ("last", "always", "never")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
BUILTIN_PREFIX = "builtin:"
DATA_PROCESSOR_KEYS = ("task_pipeline", "experience_pipeline")
TASK_PIPELINE_KEYS = (
    "operators",
    "num_process",
    "config_path",
    "inputs",
    "output",
    "target_fields",
    "priority_weights",
    "top_k",
)
# task_pipeline keys refused here, and why
TASK_PIPELINE_REFUSED = {
    "config_path": "a Data-Juicer recipe needs Data-Juicer",
    "inputs": "the pipeline runs on the training taskset's rows; point the taskset at the file",
    "output": "processed tasks are used in memory, not written",
}
PIPELINE_OUTPUT_STORAGE = ("file", "sqlite", "sql")
EXPERIENCE_PIPELINE_KEYS = ("operators", "save_input", "input_save_path", "inputs", "output")


def finalize(config: Config) -> None:
    """Validate ``config`` in place and fill its derived values.

    The top level of a multi-stage config is only a template that each stage completes (a
    stage may bring the taskset, say), so there only the paths are derived; each stage's own
    config gets the full treatment.
    """
    if config.stages:
        _derive_paths(config)
        return
    _check_mode(config)
    _check_algorithm(config)
    _check_model(config)
    _check_buffer(config)
    _check_gigpo_workflows(config)
    _check_sample_strategy(config)
    _check_explorer_trainer(config)
    _check_critic(config)
    _check_synchronizer(config)
    _check_monitor(config)
    _check_data_processor(config.data_processor)
    _derive_paths(config)


# ---- helpers ----------------------------------------------------------------------------------
def choice(
    value: Any, key: str, choices: Iterable[str], aliases: Mapping[str, str] | None = None
) -> str:
    """``value`` normalized (case-insensitive, aliases applied) or a ConfigError listing
    the choices."""
    choices = list(choices)
    text = str(value).strip().lower()
    text = (aliases or {}).get(text, text)
    if text in choices:
        return text
    return _not_one_of(value, key, choices)


def registered(value: str, key: str, names: Iterable[str]) -> str:
    """``value`` if it is a registered name (exact, as registries are), else a ConfigError."""
    names = sorted(names)
    return value if value in names else _not_one_of(value, key, names)


def _not_one_of(value: Any, key: str, choices: list[str]) -> NoReturn:
    raise ConfigError(
        f"{key}: '{value}' is not one of {', '.join(choices)}{did_you_mean(str(value), choices)}"
    )


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _at_least(value: float | None, minimum: float, key: str) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")


def _positive(value: float | None, key: str) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


# ---- sections ---------------------------------------------------------------------------------
def _check_mode(config: Config) -> None:
    config.mode = choice(config.mode, "mode", MODES)
    if config.mode == "serve":  # the proxy answers through the endpoint and trains on history
        rollout = config.explorer.rollout_model
        rollout.enable_openai_api, rollout.enable_history = True, True
        port = config.explorer.proxy_port
        require(
            isinstance(port, int) and 0 <= port <= 65535,
            f"explorer.proxy_port must be a TCP port (0 = any free one), got {port}",
        )
    if config.mode == "colocate":
        log.info("mode 'colocate' runs as 'both': the embedded runtime already shares one device")
        config.mode = "both"


def _check_algorithm(config: Config) -> None:
    algo = config.algorithm
    registered(algo.algorithm_type, "algorithm.algorithm_type", ALGORITHMS.names())
    spec = ALGORITHMS.get(algo.algorithm_type)  # the algorithm's defaults
    if algo.advantage_fn is not None:
        names = [*ADVANTAGE_FNS.names(), *BATCH_ADVANTAGE_FNS.names()]
        registered(algo.advantage_fn, "algorithm.advantage_fn", names)
    if algo.policy_loss_fn is not None:
        registered(algo.policy_loss_fn, "algorithm.policy_loss_fn", POLICY_LOSSES.names())
    advantage_fn = algo.advantage_fn or spec.advantage_fn
    fn = ADVANTAGE_FNS.get(advantage_fn) if advantage_fn in ADVANTAGE_FNS else None
    check_args = getattr(fn, "check_args", None)
    if check_args is not None:  # option values the function refuses (gigpo's fnorm, ...)
        try:
            check_args(algo.advantage_fn_args)
        except ValueError as error:
            raise ConfigError(f"algorithm.{error}") from None
    require(
        not spec.use_critic or advantage_fn == "ppo",
        f"algorithm.advantage_fn: '{algo.algorithm_type}' trains its critic on GAE returns, so "
        f"its advantage_fn must be 'ppo', got '{advantage_fn}'",
    )
    require(
        spec.use_critic or advantage_fn != "ppo",
        f"algorithm.advantage_fn: 'ppo' (GAE) needs a critic's values, which only "
        f"algorithm_type 'ppo' trains; '{algo.algorithm_type}' has none",
    )
    loss = POLICY_LOSSES.get(algo.policy_loss_fn or spec.policy_loss_fn)
    try:  # option values the loss refuses (REC's clip_mode, ...)
        loss.check_args({**loss.defaults, **spec.policy_loss_fn_args, **algo.policy_loss_fn_args})
    except ValueError as error:
        raise ConfigError(f"algorithm: {error}") from None
    for key in ("kl_loss_fn", "kl_penalty_fn"):
        if getattr(algo, key) is not None:
            registered(getattr(algo, key), f"algorithm.{key}", KL_FNS.names())
    if algo.entropy_loss_fn is not None:
        algo.entropy_loss_fn = choice(
            algo.entropy_loss_fn, "algorithm.entropy_loss_fn", ENTROPY_LOSS_FNS
        )
    if algo.sample_strategy is not None:
        algo.sample_strategy = choice(
            algo.sample_strategy, "algorithm.sample_strategy", SAMPLE_STRATEGIES
        )
    registered(algo.loss_agg_mode, "algorithm.loss_agg_mode", LOSS_AGG_MODES)

    opt = algo.optimizer
    if opt.warmup_style is not None:
        log.warning("algorithm.optimizer.warmup_style is deprecated; use lr_scheduler_type")
        opt.lr_scheduler_type = opt.warmup_style
    opt.lr_scheduler_type = choice(
        opt.lr_scheduler_type, "algorithm.optimizer.lr_scheduler_type", LR_SCHEDULERS
    )
    _positive(opt.lr, "algorithm.optimizer.lr")
    require(
        0.0 <= opt.min_lr_ratio <= 1.0,
        f"algorithm.optimizer.min_lr_ratio must be in [0, 1], got {opt.min_lr_ratio}",
    )
    require(
        0.0 <= opt.lr_warmup_steps_ratio <= 1.0,
        f"algorithm.optimizer.lr_warmup_steps_ratio must be in [0, 1], "
        f"got {opt.lr_warmup_steps_ratio}",
    )
    require(
        len(opt.betas) == 2,
        f"algorithm.optimizer.betas: expected two numbers [beta1, beta2], got {len(opt.betas)}",
    )
    _at_least(opt.weight_decay, 0, "algorithm.optimizer.weight_decay")

    for key in ("kl_loss_fn_args", "kl_penalty_fn_args"):
        require(
            not getattr(algo, key).get("adaptive"),
            f"algorithm: algorithm.{key}.adaptive is not supported; use a fixed kl_coef",
        )
    if algo.repeat_times is None:
        algo.repeat_times = spec.repeat_times
    _at_least(algo.repeat_times, 1, "algorithm.repeat_times")
    if spec.schema != "experience" and config.mode in ("both", "explore"):
        raise ConfigError(
            f"algorithm.algorithm_type: '{algo.algorithm_type}' trains on a fixed dataset and "
            f"has no explorer; use mode 'train', not '{config.mode}'"
        )


def _check_model(config: Config) -> None:
    model, tinker = config.model, config.model.tinker
    if not model.model_path and tinker.base_model:
        model.model_path = tinker.base_model
    require(bool(model.model_path), "model.model_path is required (an HF id or a local model)")
    if tinker.base_model is None:
        tinker.base_model = model.model_path
    model.critic_model_path = model.critic_model_path or model.model_path
    _at_least(tinker.rank, 1, "model.tinker.rank")

    if model.lora_configs and tinker.enable:
        for key in ("path", "exclude_modules"):
            require(
                getattr(model.lora_configs[0], key) is None,
                f"model.lora_configs[0].{key}: the Tinker backend makes its adapter from "
                "model.tinker (rank, train_mlp / train_attn / train_unembed) and cannot start "
                "from a local adapter; unset it or train on the local engine",
            )
        log.warning("model.lora_configs is ignored when model.tinker.enable is true")
    elif model.lora_configs:
        require(
            len(model.lora_configs) == 1,
            f"model.lora_configs: only one LoRA adapter is supported, got "
            f"{len(model.lora_configs)}",
        )
        _at_least(model.lora_configs[0].lora_rank, 1, "model.lora_configs[0].lora_rank")
        if model.lora_configs[0].path:
            _check_lora_path(model.lora_configs[0])
    for key in ("rope_scaling", "rope_theta"):
        require(
            getattr(model, key) is None or not tinker.enable,
            f"model.{key}: the Tinker backend serves its base models' positions as they are; "
            "unset it or train on the local engine",
        )

    _derive_lengths(model)
    _at_least(model.temperature, 0, "model.temperature")
    require(0 < model.top_p <= 1, f"model.top_p must be in (0, 1], got {model.top_p}")
    _at_least(model.top_k, -1, "model.top_k")
    require(model.top_k != 0, "model.top_k must be -1 (off) or >= 1, got 0")
    if model.chat_template_path and not Path(model.chat_template_path).is_file():
        raise ConfigError(f"model.chat_template_path: no such file '{model.chat_template_path}'")


def _check_lora_path(lora: Any) -> None:
    """The adapter to start from is a peft directory of the shape the config asks for."""
    config_file = Path(lora.path) / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"model.lora_configs[0].path: '{lora.path}' is not a peft adapter directory "
            "(no adapter_config.json)"
        )
    saved = json.loads(config_file.read_text())
    for key, theirs in (("lora_rank", "r"), ("lora_alpha", "lora_alpha")):
        require(
            saved.get(theirs) == getattr(lora, key),
            f"model.lora_configs[0].{key} is {getattr(lora, key)} but the adapter at "
            f"'{lora.path}' has {theirs}={saved.get(theirs)}",
        )


def _derive_lengths(model: Any) -> None:
    """max_model_len = prompt + response; or each half of max_model_len (the original's rule)."""
    prompt, response, total = (
        model.max_prompt_tokens,
        model.max_response_tokens,
        model.max_model_len,
    )
    for key, value in (
        ("max_prompt_tokens", prompt),
        ("max_response_tokens", response),
        ("max_model_len", total),
    ):
        _at_least(value, 1, f"model.{key}")
    if prompt is not None and response is not None:
        if total is None:
            model.max_model_len = prompt + response
        elif total < prompt + response:
            log.warning(
                "model.max_model_len (%d) < max_prompt_tokens + max_response_tokens (%d)",
                total,
                prompt + response,
            )
        return
    require(
        total is not None,
        "model.max_response_tokens is required (with max_prompt_tokens, or set max_model_len)",
    )
    if prompt is None and response is None:
        model.max_prompt_tokens = model.max_response_tokens = total // 2
    elif prompt is None:
        require(
            response < total,
            f"model.max_response_tokens ({response}) must be < max_model_len ({total})",
        )
        model.max_prompt_tokens = total - response
    else:
        require(
            prompt < total, f"model.max_prompt_tokens ({prompt}) must be < max_model_len ({total})"
        )
        model.max_response_tokens = total - prompt


def _check_buffer(config: Config) -> None:
    buffer, inputs, mode = config.buffer, config.buffer.explorer_input, config.mode
    _at_least(buffer.batch_size, 1, "buffer.batch_size")
    _at_least(buffer.train_batch_size, 0, "buffer.train_batch_size")
    _at_least(buffer.total_epochs, 1, "buffer.total_epochs")
    _at_least(buffer.total_steps, 1, "buffer.total_steps")
    if not buffer.train_batch_size:
        buffer.train_batch_size = buffer.batch_size * config.algorithm.repeat_times

    single = inputs.taskset is not None
    if single:
        require(
            not inputs.tasksets,
            "buffer.explorer_input: set either taskset or tasksets, not both",
        )
        inputs.tasksets, inputs.taskset = [inputs.taskset], None
    if mode in ("both", "explore"):
        require(
            bool(inputs.tasksets), f"buffer.explorer_input.taskset is required in mode '{mode}'"
        )
    if mode == "bench":
        require(
            bool(inputs.eval_tasksets),
            "buffer.explorer_input.eval_tasksets is required in mode 'bench'",
        )
    sft = ALGORITHMS.get(config.algorithm.algorithm_type).schema != "experience"  # a dataset
    if mode == "train" and buffer.total_steps is None:
        require(
            config.trainer.total_steps is not None or sft,
            "buffer.total_steps is required in mode 'train' (no taskset to count steps from)",
        )
        buffer.total_steps = config.trainer.total_steps  # SFT: None = epochs of the dataset

    prefix = "buffer.explorer_input"
    for key in ("default_workflow_type", "default_eval_workflow_type"):
        _check_name(getattr(inputs, key), f"{prefix}.{key}", WORKFLOWS)
    _check_name(inputs.default_reward_fn_type, f"{prefix}.default_reward_fn_type", REWARD_FUNCTIONS)
    for kind, tasksets in (("tasksets", inputs.tasksets), ("eval_tasksets", inputs.eval_tasksets)):
        seen: set[str] = set()
        for i, taskset in enumerate(tasksets):
            key = f"{prefix}.taskset" if single and kind == "tasksets" else f"{prefix}.{kind}[{i}]"
            _check_taskset(taskset, key)
            require(taskset.name not in seen, f"{key}.name: '{taskset.name}' is used twice")
            seen.add(taskset.name)
            if kind == "tasksets":
                taskset.repeat_times = config.algorithm.repeat_times

    exp = buffer.trainer_input.experience_buffer
    key = "buffer.trainer_input.experience_buffer"
    exp.storage_type = choice(exp.storage_type, f"{key}.storage_type", EXPERIENCE_STORAGE)
    if sft and mode == "train":
        require(
            exp.storage_type == "file" and bool(exp.path),
            f"{key}: algorithm '{config.algorithm.algorithm_type}' trains on a dataset; set "
            "storage_type: file and path (a local file, a directory or a Hub dataset id)",
        )
    elif exp.storage_type == "file":
        require(
            mode != "train",
            f"{key}.storage_type: 'file' is read in mode train only for SFT; otherwise it is "
            "written (mode explore)",
        )
        if mode == "both":
            log.info("%s.storage_type 'file' becomes 'queue' in mode 'both'", key)
            exp.storage_type = "queue"
    _at_least(exp.capacity, 1, f"{key}.capacity")
    _positive(exp.max_read_timeout, f"{key}.max_read_timeout")
    _check_replay_buffer(exp.replay_buffer, f"{key}.replay_buffer", exp.storage_type, mode)


def _check_gigpo_workflows(config: Config) -> None:
    """gigpo with a single-turn workflow runs, as in the original, on its episode level alone:
    said once here, before the run (where only ``gigpo/anchor_groups_total`` = 0 shows it)."""
    algo = config.algorithm
    if (algo.advantage_fn or ALGORITHMS.get(algo.algorithm_type).advantage_fn) != "gigpo":
        return
    inputs = config.buffer.explorer_input
    for taskset in inputs.tasksets:
        name = taskset.default_workflow_type or inputs.default_workflow_type
        if name in WORKFLOWS and WORKFLOWS.get(name).can_repeat:
            log.warning(
                "algorithm 'gigpo': workflow '%s' (taskset '%s') is single-turn, so no turn "
                "carries info['env_state_hash']: the step-level advantage is 0 and each sample's "
                "advantage is its task-centred reward (the episode level alone)",
                name,
                taskset.name,
            )


def _check_replay_buffer(replay: Any, key: str, storage_type: str, mode: str) -> None:
    """The original's priority functions and args; the buffer lives in the trainer's process."""
    if not replay.enable:
        return
    replay.priority_fn = choice(
        replay.priority_fn, f"{key}.priority_fn", PRIORITY_FNS, PRIORITY_FN_ALIASES
    )
    _known_keys(
        replay.priority_fn_args, f"{key}.priority_fn_args", PRIORITY_FNS[replay.priority_fn]
    )
    _positive(replay.reuse_cooldown_time, f"{key}.reuse_cooldown_time")
    require(
        mode == "both" and storage_type == "queue",
        f"{key}.enable: the replay buffer is an in-process queue (mode 'both', storage_type "
        f"'queue'), not '{storage_type}' in mode '{mode}'",
    )


def _check_sample_strategy(config: Config) -> None:
    """The strategy's args (the original's names), and the SFT dataset ``mix`` reads."""
    algo, trainer_input = config.algorithm, config.buffer.trainer_input
    name = algo.sample_strategy or ALGORITHMS.get(algo.algorithm_type).sample_strategy
    name = choice(name, "algorithm.sample_strategy", SAMPLE_STRATEGIES)  # a plugin's default too
    known = SAMPLE_STRATEGY_ARGS[name]
    _known_keys(algo.sample_strategy_args, "algorithm.sample_strategy_args", known)
    args = {**known, **algo.sample_strategy_args}
    if name == "staleness_control":
        _at_least(args["max_staleness"], 0, "algorithm.sample_strategy_args.max_staleness")
    aux = trainer_input.auxiliary_buffers
    if name == "mix":
        ratio = args["expert_data_ratio"]
        require(
            isinstance(ratio, int | float) and 0 <= ratio <= 1,
            f"algorithm.sample_strategy_args.expert_data_ratio must be in [0, 1], got {ratio}",
        )
        dataset = args["sft_dataset_name"]
        key = f"buffer.trainer_input.auxiliary_buffers.{dataset}"
        require(
            dataset in aux,
            f"{key}: sample_strategy 'mix' reads its SFT rows there (auxiliary_buffers has "
            f"{', '.join(aux) or 'nothing'})",
        )
        require(bool(aux[dataset].path), f"{key}.path is required (the SFT dataset to mix in)")
    elif aux:  # as in the original: only the mix strategy reads them
        log.warning(
            "buffer.trainer_input.auxiliary_buffers is only read by algorithm.sample_strategy "
            "'mix' (this config's is '%s'): ignored",
            name,
        )


def _check_taskset(taskset: TasksetConfig, key: str) -> None:
    require(bool(taskset.path), f"{key}.path is required (an HF id, a local path or builtin:NAME)")
    path = str(taskset.path)
    taskset.storage_type = choice(taskset.storage_type, f"{key}.storage_type", TASKSET_STORAGE)
    if taskset.storage_type == "sql":
        require(
            "://" in path,
            f"{key}.path: storage_type 'sql' reads a database: give a SQLAlchemy URL "
            f"(sqlite:///tasks.db, postgresql://...), not '{path}'",
        )
        require(bool(taskset.name), f"{key}.name is required with storage_type 'sql' (the table)")
    elif path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        _check_name(name, f"{key}.path", BUILTIN_TASKSETS, prefix=BUILTIN_PREFIX)
    else:
        require(
            not taskset.builtin_args,
            f"{key}.builtin_args is only used with path '{BUILTIN_PREFIX}NAME', not '{path}'",
        )
    for media in ("image_key", "video_key"):
        require(
            getattr(taskset.format, media) is None,
            f"{key}.format.{media}: multimodal tasks are not supported (the engines and "
            "workflows here are text-only)",
        )
    if not taskset.name:
        taskset.name = path.removeprefix(BUILTIN_PREFIX).rstrip("/").rsplit("/", 1)[-1] or "taskset"
    taskset.format.prompt_type = choice(
        taskset.format.prompt_type, f"{key}.format.prompt_type", PROMPT_TYPES
    )
    _check_selector(taskset, f"{key}.data_selector")
    _check_name(taskset.default_workflow_type, f"{key}.default_workflow_type", WORKFLOWS)
    _check_name(taskset.default_reward_fn_type, f"{key}.default_reward_fn_type", REWARD_FUNCTIONS)
    _at_least(taskset.repeat_times, 1, f"{key}.repeat_times")
    args = taskset.rollout_args
    _at_least(args.temperature, 0, f"{key}.rollout_args.temperature")
    _at_least(args.max_tokens, 1, f"{key}.rollout_args.max_tokens")
    if args.top_p is not None:
        require(
            0 < args.top_p <= 1, f"{key}.rollout_args.top_p must be in (0, 1], got {args.top_p}"
        )


def _check_selector(taskset: TasksetConfig, key: str) -> None:
    """The original's selectors with the arguments each one reads, nothing more (a key a selector
    ignores would be a silent no-op); feature columns are checked against the rows on load."""
    selector = taskset.data_selector
    kind = selector.selector_type = choice(
        selector.selector_type, f"{key}.selector_type", SELECTORS
    )
    features = list(selector.feature_keys)
    if kind in ("offline_easy2hard", "difficulty_based"):
        require(
            bool(features), f"{key}.feature_keys: {kind} sorts rows by feature columns; list them"
        )
    else:
        require(not features, f"{key}.feature_keys: {kind} reads no features, got {features}")
    if kind == "difficulty_based":
        require(
            len(features) == 2,
            f"{key}.feature_keys: difficulty_based needs exactly 2 (the pass rates of a weaker and "
            f"a stronger reference model), got {features}",
        )
        _known_keys(selector.kwargs, f"{key}.kwargs", DIFFICULTY_KWARGS)
    else:
        require(
            not selector.kwargs,
            f"{key}.kwargs: only difficulty_based takes kwargs, got {dict(selector.kwargs)}",
        )


def _check_name(name: str | None, key: str, registry: Registry, prefix: str = "") -> None:
    if name is None or name in registry:
        return
    names = registry.names()
    raise ConfigError(
        f"{key}: unknown {registry.kind} '{prefix}{name}' (known: {', '.join(names)})"
        f"{did_you_mean(name, names)}"
    )


def _check_explorer_trainer(config: Config) -> None:
    explorer, trainer = config.explorer, config.trainer
    _at_least(explorer.runner_per_model, 1, "explorer.runner_per_model")
    _at_least(explorer.rollout_model.engine_num, 1, "explorer.rollout_model.engine_num")
    _at_least(explorer.max_repeat_times_per_runner, 1, "explorer.max_repeat_times_per_runner")
    models = [("explorer.rollout_model", explorer.rollout_model)] + [
        (f"explorer.auxiliary_models[{i}]", aux) for i, aux in enumerate(explorer.auxiliary_models)
    ]
    for where, model in models:
        require(
            not model.enable_multimodal,
            f"{where}.enable_multimodal: multimodal models are not supported (the engines and "
            "workflows here are text-only)",
        )
        if model.reasoning_parser:
            model.reasoning_parser = choice(
                model.reasoning_parser, f"{where}.reasoning_parser", REASONING_PARSERS
            )
    _at_least(explorer.max_retry_times, 0, "explorer.max_retry_times")
    _positive(explorer.max_timeout, "explorer.max_timeout")
    _at_least(explorer.eval_interval, 1, "explorer.eval_interval")
    _at_least(explorer.max_inflight_batches, 1, "explorer.max_inflight_batches")
    explorer.concurrent_mode = choice(
        explorer.concurrent_mode, "explorer.concurrent_mode", CONCURRENT_MODES
    )
    for i, aux in enumerate(explorer.auxiliary_models):
        if not aux.model_path:
            raise ConfigError(
                f"explorer.auxiliary_models[{i}].model_path: required (the judge or helper "
                "model to serve: a local directory, or a base model name on Tinker)"
            )
        # served as the original serves them: behind OpenAI clients, never trained on
        aux.enable_openai_api, aux.enable_history = True, False
    _at_least(trainer.save_interval, 0, "trainer.save_interval")
    _at_least(trainer.max_checkpoints_to_keep, 0, "trainer.max_checkpoints_to_keep")
    trainer.save_hf_checkpoint = choice(
        trainer.save_hf_checkpoint, "trainer.save_hf_checkpoint", SAVE_HF_CHECKPOINT
    )
    _at_least(trainer.grad_clip, 0, "trainer.grad_clip")
    _at_least(trainer.total_steps, 1, "trainer.total_steps")
    if config.model.tinker.enable:  # recorded as the original forces them
        trainer.trainer_type = "tinker"
        explorer.rollout_model.engine_type = "tinker"
        for model in explorer.auxiliary_models:
            model.engine_type = "tinker"


def _check_critic(config: Config) -> None:
    """``trainer.trainer_config.critic`` (trinity/config/critic.py); for an algorithm with a
    critic on a Tinker service, a critic model this process can load (docs/algorithms.md)."""
    from trinity.config.critic import critic_config

    critic = critic_config(config.trainer.trainer_config)
    if not ALGORITHMS.get(config.algorithm.algorithm_type).use_critic:
        return
    where = "trainer.trainer_config.critic"
    registered(critic.loss_agg_mode, f"{where}.loss_agg_mode", LOSS_AGG_MODES.names())
    choice(
        critic.optim.warmup_style or critic.optim.lr_scheduler_type,
        f"{where}.optim.lr_scheduler_type",
        LR_SCHEDULERS,
    )
    tinker, path = config.model.tinker, config.model.critic_model_path
    if tinker.enable and tinker.base_url != "local" and not _loadable_here(path):
        raise ConfigError(
            f"model.critic_model_path: the Tinker API has no value head, so PPO's critic runs in "
            f"this process beside the remote policy; set it to a local model directory (or a "
            f"Hugging Face id in the local cache) with the policy's tokenizer, got '{path}'"
        )


def _loadable_here(path: str) -> bool:
    if Path(path).expanduser().exists():
        return True
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(path, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _check_synchronizer(config: Config) -> None:
    sync = config.synchronizer
    sync.sync_method = choice(
        sync.sync_method, "synchronizer.sync_method", SYNC_METHODS, SYNC_METHOD_ALIASES
    )
    sync.sync_style = choice(
        sync.sync_style, "synchronizer.sync_style", SYNC_STYLES, SYNC_STYLE_ALIASES
    )
    _at_least(sync.sync_interval, 1, "synchronizer.sync_interval")
    _at_least(sync.sync_offset, 0, "synchronizer.sync_offset")
    _positive(sync.sync_timeout, "synchronizer.sync_timeout")
    for key in ("explorer_sync_interval", "trainer_sync_interval"):
        _at_least(getattr(sync, key), 1, f"synchronizer.{key}")
        if getattr(sync, key) is None:
            setattr(sync, key, sync.sync_interval)
    if sync.sync_style == "fully_async":
        require(
            not config.buffer.explorer_input.eval_tasksets,
            "buffer.explorer_input.eval_tasksets are not allowed with "
            "synchronizer.sync_style 'fully_async'",
        )
    if sync.sync_style in ("trainer_driven", "fully_async"):
        buffer, inflight = config.buffer, config.explorer.max_inflight_batches
        require(
            buffer.train_batch_size <= inflight * buffer.batch_size * config.algorithm.repeat_times,
            f"buffer.train_batch_size {buffer.train_batch_size} needs more than "
            f"explorer.max_inflight_batches={inflight} explore batches of buffer.batch_size x "
            f"algorithm.repeat_times: with synchronizer.sync_style '{sync.sync_style}' the "
            "explorer would wait for a trainer waiting for it",
        )
    over, timeout = config.explorer.over_rollout, config.explorer.dynamic_timeout
    require(
        0 <= over.ratio < 1,
        f"explorer.over_rollout.ratio must be in [0, 1) (the share of a step's tasks it may "
        f"leave unfinished), got {over.ratio}",
    )
    _at_least(over.wait_after_min, 0, "explorer.over_rollout.wait_after_min")
    if timeout.enable:
        _positive(timeout.ratio, "explorer.dynamic_timeout.ratio")
        _at_least(timeout.warmup_min_steps, 0, "explorer.dynamic_timeout.warmup_min_steps")
    if config.explorer.over_rollout.ratio > 0:
        require(
            sync.sync_style != "fixed",
            "explorer.over_rollout.ratio > 0 needs a dynamic synchronizer.sync_style, not 'fixed'",
        )
    # As the original: only checkpoints cross process boundaries, and NCCL cannot carry
    # LoRA adapters or Tinker sampler paths.
    lora = bool(config.model.lora_configs) and not config.model.tinker.enable
    if config.mode != "both":
        sync.sync_method = "checkpoint"
    elif sync.sync_method == "nccl" and (config.model.tinker.enable or lora):
        sync.sync_method = "checkpoint"

    interval = sync.explorer_sync_interval
    explorer = config.explorer
    if explorer.eval_interval % interval:
        rounded = max(explorer.eval_interval // interval, 1) * interval
        log.warning(
            "explorer.eval_interval %d rounded to %d, a multiple of the sync interval",
            explorer.eval_interval,
            rounded,
        )
        explorer.eval_interval = rounded


def _check_monitor(config: Config) -> None:
    config.log.level = choice(config.log.level, "log.level", LOG_LEVELS).upper()
    value = config.monitor.monitor_type
    names = value if isinstance(value, list) else [value]
    normalized = []
    for i, name in enumerate(names):
        key = "monitor.monitor_type" + (f"[{i}]" if isinstance(value, list) else "")
        if name is None or str(name).strip().lower() in NO_MONITOR:
            normalized.append("none")
            continue
        require(isinstance(name, str), f"{key}: expected a string, got {name!r}")
        normalized.append(choice(name, key, MONITORS.names()))
    config.monitor.monitor_type = normalized if isinstance(value, list) else normalized[0]
    _at_least(config.monitor.max_rollouts, 0, "monitor.max_rollouts")


def _derive_paths(config: Config) -> None:
    for key in ("project", "name"):
        require(bool(str(getattr(config, key)).strip()), f"{key} must not be empty")
    root = Path(os.path.abspath(os.path.expanduser(config.checkpoint_root_dir or ".")))
    config.checkpoint_root_dir = str(root)
    job_dir = root / config.project / config.group / config.name
    if not config.continue_from_checkpoint and job_dir.is_dir() and any(job_dir.iterdir()):
        renamed = f"{config.name}_{time.strftime('%Y%m%d%H%M%S')}"
        log.warning(
            "continue_from_checkpoint is false and %s is not empty: this run is '%s'",
            job_dir,
            renamed,
        )
        config.name = renamed
        job_dir = root / config.project / config.group / renamed
    config.checkpoint_job_dir = str(job_dir)
    config.ray_namespace = config.ray_namespace or f"{config.project}/{config.group}/{config.name}"


def _check_data_processor(data_processor: dict[str, Any]) -> None:
    """Known sections, and operators that exist and accept their args (built once to check)."""
    _known_keys(data_processor, "data_processor", DATA_PROCESSOR_KEYS)
    _check_task_pipeline(data_processor.get("task_pipeline") or {})
    pipeline = data_processor.get("experience_pipeline") or {}
    key = "data_processor.experience_pipeline"
    require(isinstance(pipeline, dict), f"{key} must be a mapping, got {pipeline!r}")
    _known_keys(pipeline, key, EXPERIENCE_PIPELINE_KEYS)
    output = pipeline.get("output")
    if output:
        require(
            isinstance(output, dict)
            and str(output.get("storage_type") or "file").lower() in PIPELINE_OUTPUT_STORAGE
            and bool(output.get("path")),
            f"{key}.output must be a mapping with a path and a storage_type of "
            f"{', '.join(PIPELINE_OUTPUT_STORAGE)}, got {output!r}",
        )
        path = str(output["path"])
        require(
            "://" not in path
            or path.startswith("sqlite:///")
            or str(output.get("storage_type")).lower() == "sql",
            f"{key}.output.path: a database URL needs storage_type 'sql' (SQLAlchemy), got "
            f"{path} with storage_type '{output.get('storage_type') or 'file'}'",
        )
    for where, name, args in _operators(pipeline, key):
        require(
            name != "data_juicer",
            f"{where}.name: data_juicer needs a Data-Juicer service, which is not supported here",
        )
        if name not in EXPERIENCE_OPERATORS:
            raise ConfigError(f"{where}.name: {EXPERIENCE_OPERATORS.unknown_message(name)}")
        _build_operator(EXPERIENCE_OPERATORS, where, name, args)


def _check_task_pipeline(pipeline: Any) -> None:
    key = "data_processor.task_pipeline"
    require(isinstance(pipeline, dict), f"{key} must be a mapping, got {pipeline!r}")
    _known_keys(pipeline, key, TASK_PIPELINE_KEYS)
    for name, why in TASK_PIPELINE_REFUSED.items():
        require(not pipeline.get(name), f"{key}.{name}: not supported here ({why})")
    top_k = pipeline.get("top_k", -1)
    require(
        isinstance(top_k, int) and (top_k >= 1 or top_k == -1),
        f"{key}.top_k must be a positive integer or -1 (all), got {top_k!r}",
    )
    weights = pipeline.get("priority_weights") or {}
    require(
        isinstance(weights, dict) and all(isinstance(w, int | float) for w in weights.values()),
        f"{key}.priority_weights must map row fields to numbers, got {weights!r}",
    )
    fields = pipeline.get("target_fields") or []
    require(
        isinstance(fields, list) and all(isinstance(f, str) for f in fields),
        f"{key}.target_fields must be a list of row field names, got {fields!r}",
    )
    for where, name, args in _operators(pipeline, key):
        require(
            name in TASK_OPERATORS,
            f"{where}.name: '{name}' needs Data-Juicer or is unknown; the operators that run "
            f"here without it: {', '.join(sorted(TASK_OPERATORS))}",
        )
        _build_operator(TASK_OPERATORS, where, name, args)


def _operators(pipeline: Mapping[str, Any], key: str) -> Iterator[tuple[str, str, Any]]:
    """A pipeline's ``operators`` list, each entry checked to be ``{name, args}``: (where in the
    config, name, args)."""
    operators = pipeline.get("operators") or []
    require(isinstance(operators, list), f"{key}.operators must be a list of {{name, args}}")
    for index, operator in enumerate(operators):
        where = f"{key}.operators[{index}]"
        require(
            isinstance(operator, dict) and isinstance(operator.get("name"), str),
            f"{where} must be a mapping with a name, got {operator!r}",
        )
        _known_keys(operator, where, ("name", "args"))
        yield where, operator["name"], operator.get("args") or {}


def _build_operator(registry: Any, where: str, name: str, args: Any) -> None:
    """Build the operator once, so bad args are a config error before any work starts."""
    require(isinstance(args, dict), f"{where}.args must be a mapping, got {args!r}")
    try:
        registry.get(name)(**args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}.args: {name}: {exc}") from None


def _known_keys(section: Mapping[str, Any], key: str, known: Iterable[str]) -> None:
    known = list(known)
    for name in section:
        if name not in known:
            raise ConfigError(
                f"{key}.{name}: unknown key (known: {', '.join(known)}){did_you_mean(name, known)}"
            )
