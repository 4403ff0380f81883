from pathlib import Path

import pytest

from server.config import ModelConfig
from server.configload import load_settings, parse_settings
from server.units import parse_bytes
from server.errors import ConfigError


def defaults(data_dir: Path):
    return (ModelConfig(name="d", path=str(data_dir / "d")),)


def test_no_config_serves_the_defaults_under_the_data_dir(tmp_path):
    s = parse_settings(None, default_models=defaults, data_dir=tmp_path)
    assert [m.name for m in s.models] == ["d"] and s.models[0].path == str(tmp_path / "d")
    assert (s.host, s.port) == ("127.0.0.1", 8000)


def test_full_model_entry():
    s = parse_settings({"port": 9000, "models": [{
        "name": "qwen", "path": "Qwen/Qwen2.5-7B-Instruct", "aliases": ["q"], "task": "generate",
        "kv_cache_bytes": "2GiB", "max_model_len": 4096,
        "engine_args": {"enable-auto-tool-choice": True, "tool-call-parser": "hermes",
                        "enforce-eager": False, "max-num-seqs": 8}}]})
    m = s.models[0]
    assert m.kv_cache_bytes == 2 * 2**30 and m.max_model_len == 4096
    assert m.engine_args == ("--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                             "--max-num-seqs", "8")
    assert s.resolve("q") is m and s.resolve("qwen") is m and s.resolve("Q") is None
    assert s.port == 9000


@pytest.mark.parametrize("raw,where", [
    ({"models": [{"name": "a"}]}, "models[0].path: must be a non-empty string"),
    ({"models": [{"name": "a", "path": "p"}, {"name": "", "path": "p"}]}, "models[1].name"),
    ({"models": [{"name": "a", "path": "p", "aliases": ["ok", 3]}]}, "models[0].aliases[1]"),
    ({"models": [{"name": "a", "path": "p", "task": "rerank"}]}, "models[0].task"),
    ({"models": [{"name": "a", "path": "p", "kv_cache_bytes": "lots"}]}, "models[0].kv_cache_bytes"),
    ({"models": [{"name": "a", "path": "p", "colour": "red"}]}, "models[0].colour: unknown field"),
    ({"models": [{"name": "a", "path": "p"}, {"name": "b", "path": "p", "aliases": ["a"]}]},
     "models[1].aliases[0]: 'a' is already used by models[0].name"),
    ({"port": 70000, "models": [{"name": "a", "path": "p"}]}, "port: must be between"),
    ({"models": []}, "models: must be a non-empty list"),
    ({"mdoels": []}, "mdoels: unknown field"),
    ({"models": [{"name": "a", "path": "p"}], "place_wait_timeout": -1}, "place_wait_timeout"),
    ({"models": [{"name": "a", "path": "p"}], "placement": "random"}, "placement: must be"),
    ({"models": [{"name": "a", "path": "p"}], "log_format": "xml"}, "log_format: must be"),
    ({"models": [{"name": "a", "path": "p"}], "access_log": "no"}, "access_log: must be true or false"),
    ([1, 2], "(top level)"),
])
def test_errors_name_the_field_path(raw, where):
    with pytest.raises(ConfigError) as info:
        parse_settings(raw)
    assert str(info.value).startswith(where), str(info.value)


def test_bytes():
    assert parse_bytes("512MiB", "x") == 512 * 2**20
    assert parse_bytes("1.5GB", "x") == 1_500_000_000
    assert parse_bytes(1024, "x") == 1024
    for bad in (-1, True, "12 parsecs", 1.5):
        with pytest.raises(ConfigError):
            parse_bytes(bad, "x")


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")


@pytest.mark.parametrize("text,where", [
    ("models: [{name: a, path: x, 1: 2}]", "models[0].1: unknown field"),
    ("1: a\nmodels: [{name: a, path: x}]", "1: unknown field"),
    ("models: [{name: a, path: x, memory: " + "9" * 400 + "GiB}]", "models[0].memory"),
    ("shutdown_timeout: .inf\nmodels: [{name: a, path: x}]", "shutdown_timeout"),
    ("shutdown_timeout: .nan\nmodels: [{name: a, path: x}]", "shutdown_timeout"),
    ("models: [{name: a, path: x, engine_args: &a {x: *a}}]", "invalid"),
    ("simulate_gpus: abc\nmodels: [{name: a, path: x}]", "simulate_gpus"),
    ("simulate_gpus: 99999999999999999999x1GiB\nmodels: [{name: a, path: x}]", "simulate_gpus"),
    ("models: [{name: a, path: x, replicas: 100000000}]", "models[0].replicas"),
    ("models: [{name: a, path: x, gpus: [0, 0]}]", "models[0].gpus"),
])
def test_odd_files_give_a_message_not_a_traceback(tmp_path, text, where):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(f)
    assert where in str(info.value), str(info.value)


def test_non_utf8_and_bad_simulated_layout_files(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes(b"\xff\xfemodels: []")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(f)
    layout = tmp_path / "layout.yaml"
    for doc in ("gpus: [", "gpus: [{memory: 8GiB}]\nengine_memory: [1]"):
        layout.write_text(doc)
        f.write_text(f"simulate_gpus: {layout}\nmodels: [{{name: a, path: x}}]")
        with pytest.raises(ConfigError, match="simulate_gpus|engine_memory"):
            load_settings(f)


def test_ide_fields(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    s = parse_settings({"stream_keepalive": 2, "models": [{
        "name": "coder", "path": "p", "tool_parser": "none", "chat_template": str(template),
        "max_tokens_policy": "reject", "fim": {"template": "qwen", "stop": ["<|file_sep|>"]},
        "fim_max_tokens": 64, "cpu_cores": 2, "engine_env": {"VLLM_CPU_KVCACHE_SPACE": 4}}]})
    m = s.models[0]
    assert (m.tool_parser, m.chat_template, m.max_tokens_policy) == ("none", str(template), "reject")
    assert (m.fim_template, m.fim_stop, m.fim_max_tokens) == ("qwen", ("<|file_sep|>",), 64)
    assert m.cpu_cores == 2 and m.engine_env == (("VLLM_CPU_KVCACHE_SPACE", "4"),)
    assert s.stream_keepalive == 2.0
    assert parse_settings({"models": [{"name": "a", "path": "p", "fim": "none"}]}).models[0].fim_template == "none"
    custom = parse_settings({"models": [{"name": "a", "path": "p", "fim": "<PRE>{prefix}<SUF>{suffix}"}]})
    assert custom.models[0].fim_template == "<PRE>{prefix}<SUF>{suffix}"


@pytest.mark.parametrize("entry,where", [
    ({"max_tokens_policy": "clip"}, "models[0].max_tokens_policy"),
    ({"fim": "{prefix} only"}, "models[0].fim.template"),
    ({"fim": "{prefix}{suffix}{x}"}, "models[0].fim.template"),
    ({"fim": "{unclosed"}, "models[0].fim.template"),
    ({"fim": {"template": "qwen", "stop": "x"}}, "models[0].fim.stop"),
    ({"fim": {"template": "qwen", "other": 1}}, "models[0].fim"),
    ({"chat_template": "/no/such/file.jinja"}, "models[0].chat_template"),
    ({"fim_max_tokens": 0}, "models[0].fim_max_tokens"),
    ({"cpu_cores": 0}, "models[0].cpu_cores"),
    ({"engine_env": {"CUDA_VISIBLE_DEVICES": "1"}}, "models[0].engine_env.CUDA_VISIBLE_DEVICES"),
    ({"engine_env": {"BAD NAME": "1"}}, "models[0].engine_env"),
    ({"engine_env": ["A=1"]}, "models[0].engine_env"),
])
def test_ide_field_errors_name_the_field(entry, where):
    with pytest.raises(ConfigError) as info:
        parse_settings({"models": [{"name": "a", "path": "p", **entry}]})
    assert str(info.value).startswith(where), str(info.value)


def test_cpu_cores_give_engines_cores_of_their_own():
    from server.engines import cpu_binding, engine_launch

    chat, coder = ModelConfig("chat", "x"), ModelConfig("coder", "y", cpu_cores=1)
    assert cpu_binding((chat, ModelConfig("e", "z")), [0, 1]) == {}  # vLLM's own default
    assert cpu_binding((chat, coder), [0, 1]) == {"coder#0": "1", "chat#0": "0"}
    big = cpu_binding((chat, ModelConfig("coder", "y", cpu_cores=4, replicas=2)), list(range(16)))
    assert big == {"coder#0": "12-15", "coder#1": "8-11", "chat#0": "0-7"}
    # Never all the cores: the others keep at least one to share; an ask too large shares, and
    # does not take the smaller asks after it down with it.
    assert cpu_binding((chat, ModelConfig("coder", "y", cpu_cores=2)), [0, 1]) == {
        "chat#0": "0-1", "coder#0": "0-1"}
    assert cpu_binding((ModelConfig("big", "b", cpu_cores=64), coder, chat), [0, 1]) == {
        "coder#0": "1", "big#0": "0", "chat#0": "0"}
    env = engine_launch(coder, port=1, device="cpu", python="p", module="m", cpu_cores="1").env
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    own = ModelConfig("c", "y", engine_env=(("VLLM_CPU_OMP_THREADS_BIND", "0-1"),))
    assert engine_launch(own, port=1, device="cpu", python="p", module="m",
                         cpu_cores="1").env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"


def test_traffic_interval_has_a_floor():
    models = [{"name": "m", "path": "/m"}]
    assert parse_settings({"traffic_interval": 2, "models": models}).traffic_interval == 2.0
    assert parse_settings({"models": models}).traffic_interval == 5.0
    for bad in (0.01, 0):
        with pytest.raises(ConfigError, match="traffic_interval"):
            parse_settings({"traffic_interval": bad, "models": models})
