"""enable_thinking reaches the chat template (Qwen3-style: false pre-fills an empty think block)
for rollouts (model.*, overridden by explorer.rollout_model.*) and for SFT rows (format.*)."""

from __future__ import annotations

import pytest
from test_strategies import config_with
from transformers import AutoTokenizer

from trinity.buffer.sft import sft_experience
from trinity.explorer.conversation import Conversations
from trinity.launcher.backends import rollout_settings

# the parts of Qwen3's template that matter here: the flag, and answers rendered after a think block
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>"
    "{% if m.role == 'assistant' %}<think>\n\n</think>\n\n{% endif %}{{ m.content }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)
EMPTY_THINK = "<think>\n\n</think>"
CHAT = [{"role": "user", "content": "1+1?"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.mark.parametrize(("flag", "think_block"), [(False, True), (True, False), (None, False)])
def test_the_flag_reaches_the_template(tokenizer, flag, think_block):
    text = tokenizer.decode(Conversations(tokenizer, TEMPLATE, flag).prompt_tokens(CHAT))
    assert (EMPTY_THINK in text) is think_block


def test_rollout_model_overrides_model(tmp_path):
    off = {"model.enable_thinking": False}
    assert rollout_settings(config_with(tmp_path, **off)).enable_thinking is False
    both = {**off, "explorer.rollout_model.enable_thinking": True}
    assert rollout_settings(config_with(tmp_path, **both)).enable_thinking is True
    assert rollout_settings(config_with(tmp_path)).enable_thinking is None


def test_sft_rows_follow_format_enable_thinking(tokenizer):
    chat = [*CHAT, {"role": "assistant", "content": "2"}]
    rows = {
        flag: sft_experience(
            chat, tokenizer, chat_template=TEMPLATE, max_len=256, enable_thinking=flag
        )
        for flag in (False, None)
    }

    def response(row):
        return tokenizer.decode(row.tokens[row.prompt_length :])

    # off: the prompt ends with the empty think block and the model learns the answer alone
    assert response(rows[False]).strip() == "2"
    assert EMPTY_THINK in response(rows[None])
