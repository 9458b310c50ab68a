"""Chat templates as users call them: the tokenizer's own template by default,
``data.chat_template_kwargs`` (Qwen3's ``enable_thinking``) and TRL's conversational format
(system, tool calls, tool messages, a ``tools`` column), rendered exactly as TRL renders them
(``trl.data_utils.apply_chat_template``: the reference)."""

import json

import pytest
from trl.data_utils import apply_chat_template as trl_apply_chat_template

from nemo_aot.data import DataConfig, load_preference_data, load_tokenizer
from nemo_aot.data.tokenization import PromptResponseTokenizer

# A Qwen3-style template (think block on the last assistant turn, tools in the system turn, tool
# calls and responses, enable_thinking=false closing an empty think block in the prompt).
QWEN3_STYLE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}"
    "{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.last %}"
    "{{- '<think>\\n' + (message.reasoning_content or '') + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- message.content }}"
    "{%- for call in message.tool_calls or [] %}"
    "{{- '<tool_call>' + (call.function | tojson) + '</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>' + message.content }}"
    "{{- '</tool_response><|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current temperature of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TOOL_RECORD = {
    "prompt": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "How warm is Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "name": "get_weather", "content": "22"},
    ],
    "chosen": [{"role": "assistant", "content": "22 degrees."}],
    "rejected": [{"role": "assistant", "content": "No idea."}],
    "tools": json.dumps([WEATHER]),
}
PLAIN_RECORD = {"prompt": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "2+2?"}],
                "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "5"}]}


@pytest.fixture(scope="module")
def template_dir(tmp_path_factory):
    """The bundled tokenizer carrying QWEN3_STYLE as its own template, saved to a folder."""
    tok = load_tokenizer("bundled:tokenizer")
    tok.chat_template = QWEN3_STYLE
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(folder)
    return str(folder)


def _trl(record, tok, **kwargs):
    tools = record.get("tools")
    example = {k: record[k] for k in ("prompt", "chosen", "rejected")}
    out = trl_apply_chat_template(example, tok, tools=json.loads(tools) if tools else None,
                                  **kwargs)
    return out["prompt"], [out["chosen"], out["rejected"]]


def _ours(record, tok, **kwargs):
    from nemo_aot.data.formats import parse_record

    parsed = parse_record("trl_paired", record, {}, DataConfig().message_roles, "x:1")
    encoder = PromptResponseTokenizer(tok, chat_template_kwargs=kwargs)
    prompt, responses, templated = encoder.render(parsed.prompt, [parsed.chosen, parsed.rejected],
                                                  "x:1", parsed.tools)
    assert templated
    return prompt, responses


@pytest.mark.parametrize("record", [PLAIN_RECORD, TOOL_RECORD], ids=["system", "tools"])
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}], ids=["default", "no_think"])
def test_rendering_equals_trls(template_dir, record, kwargs):
    """The tokenizer's own template (loaded from its folder), with the kwargs, renders prompt
    and responses as TRL's DPO data preparation does."""
    tok = load_tokenizer(template_dir)
    assert tok.chat_template == QWEN3_STYLE
    assert _ours(record, tok, **kwargs) == _trl(record, tok, **kwargs)


def test_enable_thinking_moves_the_empty_think_block_into_the_prompt(template_dir):
    tok = load_tokenizer(template_dir)
    prompt, (chosen, _) = _ours(PLAIN_RECORD, tok)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert chosen == "<think>\n\n</think>\n\n4<|im_end|>\n"
    prompt, (chosen, _) = _ours(PLAIN_RECORD, tok, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert chosen == "4<|im_end|>\n"


def test_tools_tool_calls_and_tool_messages_reach_the_template(template_dir):
    tok = load_tokenizer(template_dir)
    prompt, _ = _ours(TOOL_RECORD, tok)
    assert prompt.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n<tools>\n{")
    assert '"name": "get_weather"' in prompt.split("</tools>")[0]
    assert ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
            in prompt)
    assert "<tool_response>22</tool_response>" in prompt
    # config-wide tools: the same schema given in data.chat_template_kwargs renders the same
    record = {k: v for k, v in TOOL_RECORD.items() if k != "tools"}
    assert _ours(record, tok, tools=[WEATHER])[0] == prompt


def test_chat_template_kwargs_reach_the_loaded_data(template_dir, tmp_path):
    """data.chat_template_kwargs through load_preference_data: the prompt tokens are those of
    the prompt TRL renders with the same kwargs."""
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(PLAIN_RECORD) + "\n" + json.dumps(TOOL_RECORD) + "\n")
    tok = load_tokenizer(template_dir)
    prompts = {}
    for name, kwargs in (("default", {}), ("no_think", {"enable_thinking": False})):
        cfg = DataConfig(train_path=str(path), validation_path=None, tokenizer_path=template_dir,
                         chat_template_kwargs=kwargs, max_seq_length=2048)
        data = load_preference_data(cfg, "train", tok)
        prompts[name] = [ex.prompt_ids.tolist() for ex in data.streams[0]]
        assert len(prompts[name]) == 2
        for ex, record in zip(data.streams[0], (PLAIN_RECORD, TOOL_RECORD)):
            prompt, (chosen, rejected) = _trl(record, tok, **kwargs)
            assert ex.prompt_ids.tolist() == tok(prompt, add_special_tokens=False)["input_ids"]
            assert ex.response_ids[0].tolist() == tok(chosen, add_special_tokens=False)[
                "input_ids"] + [tok.eos_token_id]
    assert prompts["default"] != prompts["no_think"]


def test_user_mistakes_are_named():
    from nemo_aot.data.formats import parse_record
    from nemo_aot.data.readers import RecordError

    with pytest.raises(ValueError, match=r"data.chat_template_kwargs sets \['tokenize'\]"):
        DataConfig(chat_template_kwargs={"tokenize": True}).validate()
    bad = dict(PLAIN_RECORD, prompt=[{"role": "user", "content": "x", "tool_calls": [{}]}])
    with pytest.raises(RecordError, match=r"prompt\[0\] has tool_calls but role 'user'"):
        parse_record("trl_paired", bad, {}, DataConfig().message_roles, "x:1")
    with pytest.raises(RecordError, match="'tools' is a string but not JSON"):
        parse_record("trl_paired", dict(PLAIN_RECORD, tools="[oops"), {},
                     DataConfig().message_roles, "x:1")
