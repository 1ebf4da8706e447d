"""The typed config schema: every key a Trinity-RFT 0.6.0 YAML may hold, with its defaults.

Keys mirror the original Trinity-RFT 0.6 schema, so its configs load unchanged. Keys that
only mean something to GPU engines (vLLM, veRL, Megatron) are accepted and recorded even where
this implementation ignores them; a typo is still an error because the schema is closed.

Deliberate differences from the original's defaults:
- ``algorithm.algorithm_type`` defaults to ``grpo`` (the original's ``ppo`` needs a critic);
- ``algorithm.repeat_times`` is ``None`` until the algorithm's default fills it;
- ``model.tinker.rank`` is 32 (the documented value) and ``model.tinker.base_model`` exists:
  the user's document uses it, ``null`` means ``model.model_path``.

Fields marked *derived* are filled by the loader; a value set in YAML is overwritten.
Enum-like fields are plain strings validated by the loader (case-insensitive, with the original's
aliases), so the error message can list the choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# ---- algorithm --------------------------------------------------------------------------------
@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    lr_warmup_steps: int = -1  # -1: use lr_warmup_steps_ratio
    lr_warmup_steps_ratio: float = 0.0
    min_lr_ratio: float = 0.01
    warmup_style: str | None = None  # deprecated name of lr_scheduler_type
    lr_scheduler_type: str = "constant"  # constant | cosine
    optimizer_type: str = "adam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    clip_grad: float = 1.0  # recorded; trainer.grad_clip is the value used


@dataclass
class AlgorithmConfig:
    """``None`` for a function name means "the algorithm's default" (trinity.algorithms.spec)."""

    algorithm_type: str = "grpo"
    repeat_times: int | None = None  # derived from the algorithm when unset
    sample_strategy: str | None = None
    sample_strategy_args: dict[str, Any] = field(default_factory=dict)
    advantage_fn: str | None = None
    advantage_fn_args: dict[str, Any] = field(default_factory=dict)
    kl_penalty_fn: str | None = None
    kl_penalty_fn_args: dict[str, Any] = field(default_factory=dict)
    policy_loss_fn: str | None = None
    policy_loss_fn_args: dict[str, Any] = field(default_factory=dict)
    kl_loss_fn: str | None = None
    kl_loss_fn_args: dict[str, Any] = field(default_factory=dict)
    entropy_loss_fn: str | None = None
    entropy_loss_fn_args: dict[str, Any] = field(default_factory=dict)
    loss_agg_mode: str = "token-mean"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    enable_router_replay: bool = False
    bypass_old_logprobs: bool = True
    rollout_correction: dict[str, Any] | None = None


# ---- model ------------------------------------------------------------------------------------
@dataclass
class LoraConfig:
    name: str | None = None
    path: str | None = None
    base_model_name: str | None = None
    lora_rank: int = 32
    lora_alpha: int = 32
    lora_dtype: str = "auto"
    target_modules: Any = "all-linear"  # a string or a list of module names
    exclude_modules: Any = None


@dataclass
class TinkerConfig:
    enable: bool = False
    base_model: str | None = None  # null: model.model_path (filled by the loader)
    rank: int = 32
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True
    base_url: str | None = None  # a Tinker-compatible server; "local" starts `trinity server`


@dataclass
class ExternalModelConfig:
    enable: bool = False
    base_url_env: str = "OPENAI_BASE_URL"
    api_key_env: str = "OPENAI_API_KEY"
    model_name: str | None = None


@dataclass
class ModelConfig:
    model_path: str = ""
    trust_remote_code: bool = False
    critic_model_path: str = ""  # derived: model_path when empty
    custom_chat_template: str | None = None
    chat_template_path: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    logprobs: int = 0
    max_model_len: int | None = None  # derived: max_prompt_tokens + max_response_tokens
    max_prompt_tokens: int | None = None  # derived: half of max_model_len when both unset
    max_response_tokens: int | None = None
    min_response_tokens: int = 0
    enable_prompt_truncation: bool = True
    repetition_penalty: float = 1.0
    enable_thinking: bool | None = None
    lora_configs: list[LoraConfig] | None = None
    fully_sharded_loras: bool = False
    max_cpu_loras: int | None = None
    rope_scaling: dict[str, Any] | None = None
    rope_theta: float | None = None
    tinker: TinkerConfig = field(default_factory=TinkerConfig)
    external_model: ExternalModelConfig = field(default_factory=ExternalModelConfig)


# ---- cluster ----------------------------------------------------------------------------------
@dataclass
class ClusterConfig:
    ray_address: str = "auto"
    node_num: int = 0  # 0: auto-detect (recorded; the embedded runtime needs no cluster)
    gpu_per_node: int = 0


# ---- buffer -----------------------------------------------------------------------------------
@dataclass
class FormatConfig:
    prompt_type: str = "messages"  # messages | plaintext
    prompt_key: str = "prompt"
    response_key: str = "response"
    system_prompt_key: str | None = None
    system_prompt: str | None = None
    messages_key: str = "message"
    tools_key: str = "tools"
    image_key: str | None = None
    video_key: str | None = None
    reply_prefix: str | None = None
    workflow_key: str | None = None
    reward_fn_key: str | None = None
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    enable_concatenated_multi_turn: bool = False
    chat_template: str | None = None
    enable_thinking: bool | None = None


@dataclass
class GenerationConfig:
    """Per-taskset sampling overrides; ``None`` inherits ``model.*``."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    logprobs: int | None = None
    max_tokens: int | None = None
    n: int | None = None  # the original sets it from repeat_times


@dataclass
class DataSelectorConfig:
    selector_type: str = "sequential"  # sequential | shuffle | random | offline_easy2hard | ...
    seed: int = 42
    feature_keys: list[str] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TasksetConfig:
    name: str = ""  # derived from path when empty
    storage_type: str = "file"  # file (the original also had sql)
    path: str | None = None  # HF id, local dir/file, or builtin:<name> (see builtin_args)
    subset_name: str | None = None
    split: str = "train"
    format: FormatConfig = field(default_factory=FormatConfig)
    rollout_args: GenerationConfig = field(default_factory=GenerationConfig)
    default_workflow_type: str | None = None
    default_reward_fn_type: str | None = None
    workflow_args: dict[str, Any] = field(default_factory=dict)
    reward_fn_args: dict[str, Any] = field(default_factory=dict)
    data_selector: DataSelectorConfig = field(default_factory=DataSelectorConfig)
    task_selector: dict[str, Any] | None = None  # deprecated by data_selector; recorded
    repeat_times: int | None = None  # eval tasksets; training tasksets get algorithm's (derived)
    enable_progress_bar: bool = False
    max_retry_times: int = 3
    max_retry_interval: int = 1
    builtin_args: dict[str, Any] = field(default_factory=dict)  # our extension: builtin:<name>
    seed: int | None = None  # our extension: shorthand for data_selector.seed
    shuffle: bool | None = None  # our extension: None follows data_selector.selector_type


@dataclass
class ExplorerInputConfig:
    taskset: TasksetConfig | None = None  # derived into tasksets
    tasksets: list[TasksetConfig] = field(default_factory=list)
    eval_tasksets: list[TasksetConfig] = field(default_factory=list)
    default_workflow_type: str | None = None
    default_eval_workflow_type: str | None = None
    default_reward_fn_type: str | None = None


@dataclass
class ReplayBufferConfig:
    enable: bool = False
    priority_fn: str = "linear_decay"
    reuse_cooldown_time: float | None = None
    priority_fn_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExperienceBufferConfig:
    name: str = "experience_buffer"
    storage_type: str = "queue"  # queue | sqlite | sql | file
    path: str | None = None
    capacity: int = 10000
    max_read_timeout: float = 1800.0
    replay_buffer: ReplayBufferConfig = field(default_factory=ReplayBufferConfig)
    format: FormatConfig = field(default_factory=FormatConfig)
    split: str = "train"
    subset_name: str | None = None
    max_retry_times: int = 3
    max_retry_interval: int = 1


@dataclass
class TrainerInputConfig:
    experience_buffer: ExperienceBufferConfig = field(default_factory=ExperienceBufferConfig)
    auxiliary_buffers: dict[str, ExperienceBufferConfig] = field(default_factory=dict)


@dataclass
class BufferConfig:
    batch_size: int = 1  # tasks per explore step (not multiplied by repeat_times)
    train_batch_size: int = 0  # derived when 0: batch_size * repeat_times experiences
    total_epochs: int = 1
    total_steps: int | None = None  # overrides total_epochs
    explorer_input: ExplorerInputConfig = field(default_factory=ExplorerInputConfig)
    trainer_input: TrainerInputConfig = field(default_factory=TrainerInputConfig)


# ---- explorer ---------------------------------------------------------------------------------
@dataclass
class InferenceModelConfig:
    """A rollout engine; the vLLM/SGLang knobs are recorded, the embedded engine ignores them."""

    engine_type: str = "vllm"
    engine_num: int = 1
    model_path: str | None = None  # auxiliary models; the rollout model uses model.model_path
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_expert_parallel: bool = False
    extra_engine_args: dict[str, Any] = field(default_factory=dict)
    use_v1: bool = True
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    gpu_memory_utilization: float = 0.9
    dtype: str = "bfloat16"
    seed: int = 42
    max_model_len: int | None = None
    max_prompt_tokens: int | None = None
    max_response_tokens: int | None = None
    enable_history: bool = False
    enable_openai_api: bool = False
    enable_log_requests: bool = False
    base_port: int | None = None
    api_key: str = "EMPTY"
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    enable_multimodal: bool = False
    chat_template: str | None = None
    enable_thinking: bool | None = None
    weight_sync_buffer_size: int = 1024


@dataclass
class OverRolloutConfig:
    ratio: float = 0.0
    wait_after_min: float = 30.0
    return_partial_tasks: bool = False


@dataclass
class DynamicTimeoutConfig:
    enable: bool = False
    warmup_min_steps: int = 1
    ratio: float = 3.0


@dataclass
class ExplorerConfig:
    name: str = "explorer"
    runner_per_model: int = 8  # concurrent workflows = engine_num * runner_per_model
    runner_prepare_concurrency: int = 8
    runner_prepare_max_retries: int = 2
    max_timeout: float = 1800.0
    max_retry_times: int = 2
    env_vars: dict[str, Any] = field(default_factory=dict)
    concurrent_mode: str = "sequential"  # sequential | asynchronous | multi-threading
    max_repeat_times_per_runner: int | None = None
    rollout_model: InferenceModelConfig = field(default_factory=InferenceModelConfig)
    auxiliary_models: list[InferenceModelConfig] = field(default_factory=list)
    eval_interval: int = 100
    eval_on_startup: bool = True
    bench_on_latest_checkpoint: bool = False
    proxy_port: int = 8010
    listen_address: str = "0.0.0.0"
    service_status_check_interval: int = 60
    min_running_model_num: int = 1
    db_url: str | None = None
    over_rollout: OverRolloutConfig = field(default_factory=OverRolloutConfig)
    dynamic_timeout: DynamicTimeoutConfig = field(default_factory=DynamicTimeoutConfig)
    runner_state_report_interval: int = 0
    max_inflight_batches: int = 2  # fully_async


# ---- trainer ----------------------------------------------------------------------------------
@dataclass
class TrainerConfig:
    name: str = "trainer"
    trainer_type: str = "verl"  # recorded; the backend follows model.tinker.enable
    trainer_strategy: str = "fsdp2"
    save_interval: int = 0  # 0: only the final save
    enable_preview: bool = False
    total_steps: int | None = None
    save_hf_checkpoint: str = "last"
    grad_clip: float = 1.0  # sent as AdamParams.grad_clip_norm
    use_dynamic_bsz: bool = True
    use_remove_padding: bool = True
    balance_batch: bool = True
    critic_warmup: int = 0
    max_token_len_per_gpu: int | None = None
    ulysses_sequence_parallel_size: int = 1
    fix_actor_microbatch_loss_scale: bool = False
    param_offload: bool = False
    optimizer_offload: bool = False
    grad_offload: bool = False
    offload_policy: bool = False
    save_strategy: str = "unrestricted"
    max_checkpoints_to_keep: int = 0
    megatron: dict[str, Any] = field(default_factory=dict)
    trainer_config: dict[str, Any] = field(default_factory=dict)


# ---- monitor / synchronizer / log -------------------------------------------------------------
@dataclass
class MonitorConfig:
    monitor_type: Any = "tensorboard"  # one name or a list; none | console | jsonl | ...
    monitor_args: dict[str, Any] = field(default_factory=dict)
    detailed_stats: bool = False
    enable_ray_timeline: bool = False
    # our extension: rollouts kept in <job_dir>/monitor/rollouts.db for `trinity studio`
    # (the newest ones; whole oldest steps are dropped first); 0 keeps none
    max_rollouts: int = 20000


@dataclass
class SynchronizerConfig:
    sync_method: str = "nccl"  # nccl (online) | checkpoint (offline) | memory
    sync_style: str = "fixed"  # fixed | explorer_driven | trainer_driven | fully_async
    sync_interval: int = 1
    explorer_sync_interval: int | None = None  # derived: sync_interval
    trainer_sync_interval: int | None = None  # derived: sync_interval
    sync_offset: int = 0
    sync_timeout: float = 3600.0
    group_name: str = "rollout_weight_sync"
    wait_for_checkpoint: bool = False


@dataclass
class LogConfig:
    level: str = "INFO"
    group_by_node: bool = False


# ---- stages and the root ----------------------------------------------------------------------
@dataclass
class StageConfig:
    """One stage: the sections it sets override the global ones (checked as a full config)."""

    stage_name: str = ""
    mode: str | None = None
    algorithm: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    buffer: dict[str, Any] = field(default_factory=dict)
    data_processor: dict[str, Any] = field(default_factory=dict)
    explorer: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    synchronizer: dict[str, Any] = field(default_factory=dict)
    monitor: dict[str, Any] = field(default_factory=dict)
    config: Any = None  # derived: this stage's full, validated Config (name = name/stage_name)


@dataclass
class Config:
    mode: str = "both"  # both | explore | train | bench | serve (colocate = both)
    project: str = "Trinity-RFT"
    group: str = ""
    name: str = "rft"
    checkpoint_root_dir: str = ""  # made absolute (relative to the working directory)
    checkpoint_job_dir: str = ""  # derived: <checkpoint_root_dir>/<project>/<group>/<name>
    ray_namespace: str = ""  # derived: <project>/<group>/<name>
    continue_from_checkpoint: bool = True
    ignore_validator_suggestions: bool = False
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data_processor: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    explorer: ExplorerConfig = field(default_factory=ExplorerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    synchronizer: SynchronizerConfig = field(default_factory=SynchronizerConfig)
    service: dict[str, Any] = field(default_factory=dict)
    log: LogConfig = field(default_factory=LogConfig)
    stages: list[StageConfig] = field(default_factory=list)
