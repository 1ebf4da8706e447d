"""Config loading: the seeds and the example validate, derived values, interpolation, and one
line per broken config (``tests/configs/broken/*.yaml``, each naming its expected message in
``# expect:`` comments)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trinity.config import Config, ConfigError, build_config, load_config, read_yaml, to_yaml

HERE = Path(__file__).parent
REPO = HERE.parent
SEEDS = sorted((HERE / "configs" / "seed").glob("*.yaml"))
BROKEN = sorted((HERE / "configs" / "broken").glob("*.yaml"))
SHARED_SEEDS = REPO.parent / "shared" / "seed"
DEMO = REPO / "examples" / "grpo_demo.yaml"

MINIMAL = """
model:
  model_path: demo
  max_prompt_tokens: 128
  max_response_tokens: 16
buffer:
  batch_size: 2
  total_steps: 2
  explorer_input:
    taskset:
      path: builtin:arithmetic
"""


def expected_fragments(path: Path) -> list[str]:
    return re.findall(r"^# expect: (.*)$", path.read_text(), re.M)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def _no_checkpoint_env(monkeypatch):
    monkeypatch.delenv("TRINITY_CHECKPOINT_ROOT_DIR", raising=False)


# ---- the configs that must load ---------------------------------------------------------------
def test_seed_copies_are_unchanged():
    assert len(SEEDS) == 2
    if not SHARED_SEEDS.is_dir():
        pytest.skip("shared/seed is not beside the repository")
    for seed in SEEDS:
        assert seed.read_bytes() == (SHARED_SEEDS / seed.name).read_bytes()


@pytest.mark.parametrize("path", SEEDS, ids=lambda p: p.stem)
def test_seed_configs_validate(path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    assert config.mode == "both"
    assert config.algorithm.algorithm_type == "grpo"
    assert config.algorithm.repeat_times == 8
    assert config.buffer.train_batch_size == 96 * 8
    assert config.model.tinker.base_model == "meta-llama/Llama-3.2-3B"
    assert config.model.tinker.rank == 32
    assert config.model.max_model_len == 1024 + 2048
    assert config.model.custom_chat_template.startswith("{{- bos_token }}")
    (taskset,) = config.buffer.explorer_input.tasksets
    assert config.buffer.explorer_input.taskset is None
    assert (taskset.name, taskset.path, taskset.subset_name) == ("taskset", "openai/gsm8k", "main")
    assert taskset.format.prompt_key == "question" and taskset.repeat_times == 8
    assert config.synchronizer.sync_method == "checkpoint"
    assert (config.synchronizer.sync_interval, config.synchronizer.sync_offset) == (1, 1)
    assert config.synchronizer.explorer_sync_interval == 1
    assert config.checkpoint_root_dir == str(tmp_path / "checkpoints")
    assert config.checkpoint_job_dir == str(
        tmp_path / "checkpoints" / "Trinity-RFT-gsm8k" / "alignment-tinker" / config.name
    )
    assert config.monitor.monitor_type == "wandb"


def test_tinker_seed_specifics():
    config = load_config(HERE / "configs" / "seed" / "tinker-llama3.2-3b-gsm8k.yaml")
    assert config.model.tinker.enable
    assert config.trainer.trainer_type == "tinker"
    assert config.explorer.rollout_model.engine_type == "tinker"


def test_verl_seed_specifics():
    config = load_config(HERE / "configs" / "seed" / "verl-llama3.2-3b-lora-gsm8k.yaml")
    assert not config.model.tinker.enable
    (lora,) = config.model.lora_configs
    assert (lora.name, lora.lora_rank, lora.lora_alpha) == ("lora", 32, 32)
    assert config.trainer.trainer_type == "verl"
    assert config.explorer.rollout_model.gpu_memory_utilization == 0.9
    assert config.data_processor == {}


def test_demo_example_validates():
    config = load_config(DEMO)
    (taskset,) = config.buffer.explorer_input.tasksets
    assert taskset.path == "builtin:arithmetic"
    assert taskset.builtin_args == {"num_terms": 2, "max_operand": 9}
    assert taskset.format.system_prompt == "Answer with the number only."
    assert config.buffer.train_batch_size == 48  # 6 prompts x 8 samples
    assert config.model.tinker.base_model == "demo"
    assert config.model.tinker.enable and config.model.tinker.base_url == "local"
    assert config.synchronizer.sync_method == "memory"


def test_documented_tinker_section_is_accepted():
    """The user's document shows this section (with base_model, absent from the original)."""
    section = REPO.parent / "shared" / "seed" / "model-tinker-section.yaml"
    text = (
        section.read_text()
        if section.is_file()
        else ("model:\n  tinker:\n    enable: true\n    base_model: null\n    rank: 32\n")
    )
    raw = OmegaConf.merge(OmegaConf.create(MINIMAL), OmegaConf.create(text))
    config = build_config(raw)
    assert config.model.tinker.enable and config.model.tinker.base_model == "demo"
    assert config.model.tinker.rank == 32 and config.model.tinker.seed is None


def test_light_import():
    code = "import sys, trinity.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---- interpolation and overrides --------------------------------------------------------------
def test_env_interpolation_and_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(DEMO).checkpoint_root_dir == str(tmp_path / "checkpoints")
    monkeypatch.setenv("TRINITY_CHECKPOINT_ROOT_DIR", str(tmp_path / "elsewhere"))
    config = load_config(DEMO)
    assert config.checkpoint_root_dir == str(tmp_path / "elsewhere")
    assert config.checkpoint_job_dir == str(tmp_path / "elsewhere" / "trinity-demo/grpo/arithmetic")


def test_key_interpolation_reaches_defaults_and_converts_types(tmp_path, monkeypatch):
    monkeypatch.setenv("TRINITY_TEST_RESPONSE_LEN", "24")
    path = write(
        tmp_path,
        MINIMAL.replace(
            "max_response_tokens: 16", "max_response_tokens: ${oc.env:TRINITY_TEST_RESPONSE_LEN}"
        )
        + "name: ${project}-${model.model_path}\n"
        + "checkpoint_root_dir: "
        + str(tmp_path)
        + "\n"
        + "trainer:\n  save_interval: ${buffer.total_steps}\n",
    )
    config = load_config(path)
    assert config.model.max_response_tokens == 24  # a string from the environment, typed int
    assert config.name == "Trinity-RFT-demo"  # project comes from the schema's default
    assert config.trainer.save_interval == 2
    assert config.checkpoint_job_dir == str(tmp_path / "Trinity-RFT" / "Trinity-RFT-demo")


def test_overrides_as_dotlist_and_mapping(tmp_path):
    path = write(tmp_path, MINIMAL)
    config = load_config(path, ["algorithm.repeat_times=4", "model.tinker.rank=8"])
    assert config.buffer.train_batch_size == 8 and config.model.tinker.rank == 8
    config = load_config(path, {"buffer.batch_size": 3, "algorithm": {"repeat_times": 2}})
    assert config.buffer.train_batch_size == 6
    with pytest.raises(ConfigError, match=r"unknown key 'model.tinker.rnak' \(did you mean 'rank'"):
        load_config(path, ["model.tinker.rnak=8"])


@pytest.mark.parametrize("path", [DEMO, *SEEDS], ids=lambda p: p.stem)
def test_resolved_yaml_loads_again(path, tmp_path):
    config = load_config(path)
    again = load_config(write(tmp_path, to_yaml(config)))
    assert again == config


# ---- derived values and combination rules -----------------------------------------------------
def test_defaults_come_from_the_algorithm(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.algorithm.algorithm_type == "grpo"
    assert config.algorithm.repeat_times == 2  # grpo's default
    assert config.buffer.train_batch_size == 4
    assert config.model.max_model_len == 144
    assert config.model.critic_model_path == "demo"
    assert config.buffer.explorer_input.tasksets[0].name == "arithmetic"
    assert config.ray_namespace == "Trinity-RFT//rft"
    assert isinstance(config, Config)


def test_lengths_from_max_model_len(tmp_path):
    text = MINIMAL.replace(
        "  max_prompt_tokens: 128\n  max_response_tokens: 16\n", "  max_model_len: 100\n"
    )
    model = load_config(write(tmp_path, text)).model
    assert (model.max_prompt_tokens, model.max_response_tokens) == (50, 50)
    text = MINIMAL.replace("  max_prompt_tokens: 128\n", "  max_model_len: 100\n")
    model = load_config(write(tmp_path, text)).model
    assert (model.max_prompt_tokens, model.max_response_tokens) == (84, 16)


def test_tinker_with_lora_warns_not_fails(caplog):
    raw = OmegaConf.merge(
        OmegaConf.create(MINIMAL),
        {"model": {"tinker": {"enable": True}, "lora_configs": [{"lora_rank": 8}, {}]}},
    )
    with caplog.at_level(logging.WARNING, logger="trinity.config"):
        config = build_config(raw)
    assert "lora_configs is ignored" in caplog.text
    assert config.synchronizer.sync_method == "checkpoint"  # nccl cannot carry Tinker weights


def test_enum_aliases_and_case(tmp_path):
    text = (
        MINIMAL + "mode: COLOCATE\nsynchronizer:\n  sync_method: offline\n"
        "  sync_style: dynamic_by_explorer\n  sync_interval: 4\n"
        "explorer:\n  eval_interval: 10\n"
        "algorithm:\n  optimizer:\n    warmup_style: Cosine\n"
    )
    config = load_config(write(tmp_path, text))
    assert config.mode == "both"
    assert config.synchronizer.sync_method == "checkpoint"
    assert config.synchronizer.sync_style == "explorer_driven"
    assert config.synchronizer.trainer_sync_interval == 4
    assert config.explorer.eval_interval == 8  # rounded to a multiple of the sync interval
    assert config.algorithm.optimizer.lr_scheduler_type == "cosine"


def test_split_modes_sync_by_checkpoint(tmp_path):
    text = MINIMAL + "mode: explore\nsynchronizer:\n  sync_method: nccl\n"
    assert load_config(write(tmp_path, text)).synchronizer.sync_method == "checkpoint"
    text = MINIMAL.replace("  total_steps: 2\n", "") + "mode: train\ntrainer:\n  total_steps: 5\n"
    config = load_config(write(tmp_path, text))
    assert config.buffer.total_steps == 5


def test_continue_from_checkpoint_false_renames_a_used_dir(tmp_path):
    text = MINIMAL + f"checkpoint_root_dir: {tmp_path}\ncontinue_from_checkpoint: false\n"
    path = write(tmp_path, text)
    job_dir = Path(load_config(path).checkpoint_job_dir)
    job_dir.mkdir(parents=True)
    (job_dir / "trainer_meta.json").write_text("{}")
    renamed = load_config(path)
    assert re.fullmatch(r"rft_\d{14}", renamed.name)
    assert Path(renamed.checkpoint_job_dir).parent == job_dir.parent


SFT_DATA = (  # an SFT stage reads its dataset through the trainer's experience buffer
    "    trainer_input:\n      experience_buffer:\n        storage_type: file\n"
    "        path: chats.jsonl\n"
)


def test_stages_are_full_configs(tmp_path):
    text = MINIMAL + (
        "name: run\nstages:\n"
        "- stage_name: sft\n  mode: train\n  algorithm:\n    algorithm_type: sft\n"
        "  buffer:\n    total_steps: 3\n"
        + SFT_DATA
        + "- stage_name: rl\n  algorithm:\n    repeat_times: 4\n"
    )
    config = load_config(write(tmp_path, text))
    sft, rl = (stage.config for stage in config.stages)
    assert (sft.name, sft.mode, sft.algorithm.algorithm_type) == ("run/sft", "train", "sft")
    assert sft.buffer.total_steps == 3 and sft.synchronizer.sync_method == "checkpoint"
    assert (rl.name, rl.mode, rl.algorithm.repeat_times) == ("run/rl", "both", 4)
    assert rl.buffer.train_batch_size == 8
    assert rl.checkpoint_job_dir.endswith("/run/rl")
    assert "config: null" in to_yaml(config)


def test_stage_may_complete_the_template(tmp_path):
    """The top level alone lacks a taskset; only the stage that explores needs one."""
    template = MINIMAL.replace(
        "  explorer_input:\n    taskset:\n      path: builtin:arithmetic\n", ""
    )
    text = template + (
        "stages:\n- stage_name: sft\n  mode: train\n  algorithm:\n    algorithm_type: sft\n"
        "  buffer:\n"
        + SFT_DATA
        + "- stage_name: rl\n  buffer:\n    explorer_input:\n      taskset:\n"
        "        path: builtin:countdown\n"
    )
    config = load_config(write(tmp_path, text))
    assert config.stages[1].config.buffer.explorer_input.tasksets[0].name == "countdown"
    with pytest.raises(
        ConfigError, match=r"^stages\[0\] \('sft'\): algorithm.algorithm_type: 'sfx'"
    ):
        load_config(write(tmp_path, text.replace("algorithm_type: sft", "algorithm_type: sfx")))


def test_read_yaml_reads_exponent_floats(tmp_path):
    node = read_yaml(write(tmp_path, "algorithm:\n  optimizer:\n    lr: 1e-5\n"))
    assert node.algorithm.optimizer.lr == pytest.approx(1e-5)


# ---- broken configs ---------------------------------------------------------------------------
def test_enough_broken_configs():
    assert len(BROKEN) >= 22
    assert all(expected_fragments(path) for path in BROKEN)


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_broken_config_message(path, monkeypatch):
    monkeypatch.delenv("TRINITY_TEST_SURELY_UNSET", raising=False)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in expected_fragments(path):
        assert fragment in message


def test_dynamic_sync_refuses_a_train_batch_beyond_the_batches_in_flight(tmp_path):
    demo = Path(__file__).parent.parent / "examples" / "grpo_demo.yaml"
    base = ["synchronizer.sync_style=fully_async", "explorer.max_inflight_batches=1"]
    config = load_config(demo, base)
    explore_batch = config.buffer.batch_size * config.algorithm.repeat_times
    assert config.buffer.train_batch_size == explore_batch
    with pytest.raises(
        ConfigError, match=r"^buffer.train_batch_size \d+ .*max_inflight_batches=1 "
    ):
        load_config(demo, [*base, f"buffer.train_batch_size={explore_batch + 1}"])
    load_config(demo, [*base[:1], f"buffer.train_batch_size={explore_batch + 1}"])  # two fit
