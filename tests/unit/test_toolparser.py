"""Which tool-call parser each family gets, how it reaches the engine's command line, and what the
embedded chat model's template shows the model."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from server import toolparser
from server.config import ModelConfig
from server.engines import engine_launch
from server.modelfiles import ModelFiles, read_model_files
from server.models import CHAT_TEMPLATE, embedded_models
from server.profile import profile, read_files


def files(tokens=(), template="", model_type="") -> ModelFiles:
    return ModelFiles(tokens=MappingProxyType({t: i for i, t in enumerate(tokens)}),
                      chat_template=template, model_type=model_type)


@pytest.mark.parametrize("parser, found", [
    ("llama3_json", files(["<|begin_of_text|>", "<|python_tag|>", "<|eot_id|>"])),
    ("llama4_pythonic", files(["<|header_start|>", "<|eom|>"])),
    ("mistral", files(["[INST]", "[TOOL_CALLS]"])),
    ("hermes", files(["<|im_start|>", "<|im_end|>"])),  # SmolLM2, any ChatML model
    ("hermes", files(["<|im_start|>", "<tool_call>"])),  # Qwen2.5
    ("qwen3_coder", files(["<|im_start|>", "<tool_call>"], "<tool_call>\n<function=name>")),
    ("granite", files(["<|start_of_role|>", "<|tool_call|>"])),
    ("deepseek_v3", files(["<｜tool▁calls▁begin｜>"], "```json\n")),
    ("deepseek_v31", files(["<｜tool▁calls▁begin｜>"])),
    ("openai", files(["<|channel|>", "<|start|>"])),
    ("kimi_k2", files(["<|tool_calls_section_begin|>"])),
])
def test_parser_from_the_models_own_files(parser, found):
    assert toolparser.detect(found, "some-model") == parser


@pytest.mark.parametrize("name, parser", [
    ("meta-llama/Llama-3.1-8B-Instruct", "llama3_json"), ("mistralai/Mistral-7B-Instruct-v0.3", "mistral"),
    ("Qwen/Qwen3-Coder-30B-A3B", "qwen3_coder"), ("Qwen/Qwen2.5-7B-Instruct", "hermes"),
    ("ibm-granite/granite-3.1-8b-instruct", "granite"), ("unknown/thing", "hermes"),
])
def test_parser_from_the_name_when_no_files_are_on_disk(name, parser):
    assert toolparser.detect(ModelFiles(), name) == parser


def test_configured_parser_wins_and_none_turns_tools_off():
    m = ModelConfig("m", "/nonexistent")
    assert profile(m, ModelFiles()).tool_parser == "hermes"
    assert profile(ModelConfig("m", "/x", tool_parser="mistral"), ModelFiles()).tool_parser == "mistral"
    assert profile(ModelConfig("m", "/x", tool_parser="none"), ModelFiles()).tool_parser is None
    args = ModelConfig("m", "/x", engine_args=("--enable-auto-tool-choice", "--tool-call-parser", "pythonic"))
    assert profile(args, ModelFiles()).tool_parser == "pythonic"
    assert profile(ModelConfig("e", "/x", task="embed"), ModelFiles()).tool_parser is None


def test_tools_reach_the_engine_command_line_with_argument_schemas_enforced():
    m = ModelConfig("m", "/models/m", chat_template="/t.jinja")
    argv = engine_launch(m, port=1, device="cpu", python="py", module="v", tool_parser="hermes").argv
    i = argv.index("--tool-call-parser")
    assert argv[i + 1] == "hermes" and "--enable-auto-tool-choice" in argv
    assert argv[argv.index("--tool-strict-level") + 1] == "parameter"
    assert argv[argv.index("--chat-template") + 1] == "/t.jinja"
    plain = engine_launch(m, port=1, device="cpu", python="py", module="v").argv
    assert "--enable-auto-tool-choice" not in plain
    own = ModelConfig("m", "/m", engine_args=("--tool-call-parser", "x"))
    argv = engine_launch(own, port=1, device="cpu", python="py", module="v", tool_parser="x").argv
    assert argv.count("--tool-call-parser") == 1  # the model's own engine_args, not twice
    assert "--enable-auto-tool-choice" in argv and "--tool-strict-level" in argv  # still on


def test_embedded_chat_model_gets_the_tool_template(tmp_path):
    chat, embed = embedded_models(tmp_path)
    assert chat.chat_template == str(CHAT_TEMPLATE) and CHAT_TEMPLATE.is_file()
    prof = profile(chat, read_files(chat))
    assert prof.tool_parser == "hermes" and prof.fim is None
    assert "<tool_call>" in read_files(chat).chat_template


def test_template_shows_tools_and_tool_results_in_hermes_form():
    jinja2 = pytest.importorskip("jinja2")  # installed with vLLM/transformers
    env = jinja2.Environment()
    env.filters["tojson"] = lambda v: __import__("json").dumps(v)
    template = env.from_string(CHAT_TEMPLATE.read_text())
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "1", "type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "tool_call_id": "1", "content": "sunny"}]
    text = template.render(messages=messages, tools=[tool], add_generation_prompt=True)
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    plain = template.render(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert plain == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                     "Hugging Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_model_files_from_a_folder_and_the_hub_cache(tmp_path):
    import json
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(
        {"added_tokens": [{"id": 3, "content": "<|im_start|>"}], "model": {"vocab": {}}}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|im_end|>"}, "chat_template": "{{ x }}"}))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    found = read_model_files(str(folder))
    assert found.token_id("<|im_start|>") == 3 and found.eos == "<|im_end|>"
    assert found.chat_template == "{{ x }}" and found.model_type == "qwen2"
    hub = tmp_path / "hub" / "models--org--name"
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text("abc")
    (hub / "snapshots").mkdir()
    (folder).rename(hub / "snapshots" / "abc")
    assert read_model_files("org/name", cache=tmp_path / "hub").token_id("<|im_start|>") == 3
    assert read_model_files("org/missing", cache=tmp_path / "hub").folder is None


@pytest.mark.parametrize("name, text", [
    ("tokenizer.json", '{"model": "BPE", "added_tokens": []}'),
    ("tokenizer.json", '{"added_tokens": 5}'),
    ("tokenizer.json", '{"model": {"vocab": [[["x"], 0.0]]}}'),
    ("tokenizer.json", "[" * 100000 + "]" * 100000),
    ("tokenizer.json", "\x00\x01 not json"),
    ("chat_template.json", "[1]"),
    ("chat_template.json", '"x"'),
    ("tokenizer_config.json", '{"added_tokens_decoder": [1, 2], "eos_token": 7}'),
])
def test_odd_model_files_never_raise(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    files = read_model_files(str(tmp_path))
    assert files.folder == tmp_path
    assert profile(ModelConfig("m", str(tmp_path)), files).tool_parser == "hermes"
    assert read_model_files("org/a\x00b").folder is None
