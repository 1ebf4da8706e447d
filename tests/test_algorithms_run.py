"""Each algorithm type added for the original runs a real step on both backends (the local engine
and the Tinker SDK against ``trinity server``) with a tiny model: a ``trinity run`` each."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.test_rl_loop import backend_model, job_dir, run_cli, trainer_records, write_config

RL = ["gspo", "sapo", "topr", "sppo", "rec", "grpo_verl", "multi_step_grpo"]


def one_step_config(tmp_path, model_dir, backend, algorithm):
    base = yaml.safe_load(write_config(tmp_path, model_dir).read_text())
    return write_config(
        tmp_path,
        model_dir,
        model=backend_model(tmp_path, model_dir, backend),
        algorithm={"algorithm_type": algorithm, "repeat_times": 4, "optimizer": {"lr": 1e-3}},
        buffer={**base["buffer"], "total_steps": 1},
    )


@pytest.mark.parametrize("backend", ["local", "tinker"])
@pytest.mark.parametrize("algorithm", RL)
def test_rl_algorithm_runs_a_step(tmp_path, tiny_model_dir, algorithm, backend):
    run_cli(one_step_config(tmp_path, tiny_model_dir, backend, algorithm))
    steps = trainer_records(job_dir(tmp_path))
    assert sorted(steps) == [1]
    assert steps[1]["actor/final_loss"] == pytest.approx(steps[1]["actor/final_loss"])  # not NaN


def dataset_config(tmp_path, model_dir, backend, algorithm, rows, epochs, lr=1e-2):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return write_config(
        tmp_path,
        model_dir,
        mode="train",
        model=backend_model(tmp_path, model_dir, backend),
        algorithm={"algorithm_type": algorithm, "optimizer": {"lr": lr}},
        buffer={
            "batch_size": len(rows),
            "train_batch_size": len(rows),
            "total_epochs": epochs,
            "total_steps": None,
            "trainer_input": {
                "experience_buffer": {"name": algorithm, "storage_type": "file", "path": str(data)}
            },
        },
    )


@pytest.mark.parametrize("backend", ["local", "tinker"])
def test_dpo_reward_margin_grows_on_a_fixed_batch(tmp_path, tiny_model_dir, backend):
    """Two preference pairs, the whole dataset each step: the implicit reward margin (measured
    before each step's update) starts at 0 (the policy is the reference) and grows."""
    rows = [
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "five, I think"},
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome or so"},
    ]
    run_cli(dataset_config(tmp_path, tiny_model_dir, backend, "dpo", rows, epochs=4))
    steps = trainer_records(job_dir(tmp_path))
    assert sorted(steps) == [1, 2, 3, 4]
    margins = [steps[s]["actor/reward_margin"] for s in sorted(steps)]
    assert margins[0] == pytest.approx(0.0, abs=1e-3)  # bf16 engines round the two passes apart
    assert margins[1] > margins[0] and margins[3] > margins[1], margins
    assert steps[4]["actor/reward_accuracy"] == 1.0
    # independently of the loss's own bookkeeping: the exported adapter prefers each chosen
    # answer over its rejected one more than the base model does
    for margin in trained_margins(tiny_model_dir, job_dir(tmp_path) / "final_adapter", rows):
        assert margin > 0


def trained_margins(model_dir, adapter_dir, rows):
    """Per row: (log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected), with HF + peft."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trinity.buffer.sft import preference_chats, sft_experience
    from trinity.config.schema import FormatConfig

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    def response_logprob(model, exp):
        with torch.no_grad():
            logits = model(torch.tensor([exp.tokens])).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(exp.tokens[1:])[:, None])
        return float(lp[exp.prompt_length - 1 :].sum())

    pairs = [
        [
            sft_experience(chat, tokenizer, chat_template=None, max_len=256)
            for chat in preference_chats(row, FormatConfig())
        ]
        for row in rows
    ]
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    before = [[response_logprob(base, exp) for exp in pair] for pair in pairs]
    tuned = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    after = [[response_logprob(tuned, exp) for exp in pair] for pair in pairs]
    return [(a[0] - b[0]) - (a[1] - b[1]) for a, b in zip(after, before, strict=True)]


@pytest.mark.parametrize("backend", ["local", "tinker"])
def test_cpt_trains_on_raw_text(tmp_path, tiny_model_dir, backend):
    rows = [{"text": f"The number {i} is followed by {i + 1}."} for i in range(4)]
    run_cli(dataset_config(tmp_path, tiny_model_dir, backend, "cpt", rows, epochs=4))
    steps = trainer_records(job_dir(tmp_path))
    assert sorted(steps) == [1, 2, 3, 4]
    losses = [steps[s]["actor/final_loss"] for s in sorted(steps)]
    assert losses[-1] < losses[0]
    assert steps[1]["prompt_length/mean"] == 1.0  # every token after the first is trained


def test_preference_rows_as_prompt_response_or_messages(tiny_model_dir):
    from transformers import AutoTokenizer

    from trinity.buffer.sft import preference_chats, sft_experience
    from trinity.config.schema import FormatConfig

    fmt = FormatConfig(chosen_key="good", rejected_key="bad")
    user = {"role": "user", "content": "2 + 2?"}
    plain = {"prompt": "2 + 2?", "good": "4", "bad": "5"}
    as_messages = {
        "message": [user],
        "good": [{"role": "assistant", "content": "4"}],
        "bad": [{"role": "assistant", "content": "5"}],
    }
    full_chats = {
        "good": [user, {"role": "assistant", "content": "4"}],
        "bad": [user, {"role": "assistant", "content": "5"}],
    }
    expected = preference_chats(plain, fmt)
    assert expected[0] == [user, {"role": "assistant", "content": "4"}]
    assert preference_chats(as_messages, fmt) == expected
    assert preference_chats(full_chats, fmt) == expected
    with pytest.raises(Exception, match="format.rejected_key"):
        preference_chats({"prompt": "x", "good": "y"}, fmt)

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    chosen, rejected = (
        sft_experience(c, tokenizer, chat_template=None, max_len=256) for c in expected
    )
    assert chosen.prompt_length == rejected.prompt_length
    assert chosen.tokens[: chosen.prompt_length] == rejected.tokens[: rejected.prompt_length]
    assert chosen.tokens != rejected.tokens


def test_cpt_experience_trains_every_token_after_the_first(tiny_model_dir):
    from transformers import AutoTokenizer

    from trinity.buffer.sft import cpt_experience

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    exp = cpt_experience("Raw text, no chat template.", tokenizer, max_len=256)
    assert exp.tokens == tokenizer("Raw text, no chat template.")["input_ids"]
    assert exp.prompt_length == 1 and exp.loss_mask == [1] * (len(exp.tokens) - 1)
