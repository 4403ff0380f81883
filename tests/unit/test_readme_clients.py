"""The README's agent-client snippets are the configurations the e2e suite runs (tests/clients):
each snippet is parsed from README.md and compared with what the recipe writes."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from tests import clients

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
URL = "http://127.0.0.1:8000"
# Settings the tests need and a person does not (no retries, a long timeout, no crash reports).
TEST_ONLY = {"CLAUDE_CODE_MAX_RETRIES", "API_TIMEOUT_MS", "DISABLE_ERROR_REPORTING"}


def blocks(after: str) -> list[tuple[str, str]]:
    """The fenced code blocks (language, text) of the README paragraph that starts with ``after``,
    up to the next client's paragraph."""
    start = README.index(after)
    end = README.find("\n**", start + len(after))
    return re.findall(r"```(\w+)\n(.*?)```", README[start:end], re.S)


def recipe(name: str, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    env: dict[str, str] = {}
    argv = clients.RECIPES[name](URL, "smollm2", tmp_path, env)
    return argv, env


def test_claude_code_environment_and_command(tmp_path):
    argv, env = recipe("claude", tmp_path)
    shell = dict(blocks("**Claude Code**"))["bash"]
    exported = dict(pair.split("=", 1) for line in shell.splitlines() if line.startswith("export ")
                    for pair in line.split("#")[0].split()[1:])
    wanted = {k: v for k, v in env.items() if k not in TEST_ONLY}
    assert {k: exported.get(k) for k in wanted} == wanted
    command = next(line for line in shell.splitlines() if line.startswith("claude "))
    for flag in ("--bare", "--tools Read,Bash", "--system-prompt"):
        assert flag in command and flag.split()[0] in argv
    assert command.index('"Say hello"') < command.index("--tools")  # --tools eats what follows


def test_codex_config(tmp_path):
    recipe("codex", tmp_path)
    written = tomllib.loads((tmp_path / "codex-home" / "config.toml").read_text())
    shown = tomllib.loads(dict(blocks("**Codex CLI**"))["toml"])
    for doc in (written, shown):
        doc.pop("model_instructions_file")
        for provider in doc["model_providers"].values():
            for key in ("request_max_retries", "stream_max_retries", "stream_idle_timeout_ms"):
                provider.pop(key, None)  # test-only: no retries, a long idle timeout
    assert shown == written


def test_continue_config(tmp_path):
    argv, _ = recipe("cn", tmp_path)
    assert yaml.safe_load(dict(blocks("**Continue**"))["yaml"]) == yaml.safe_load(
        (tmp_path / "continue.yaml").read_text())


def test_cline_providers(tmp_path):
    argv, _ = recipe("cline", tmp_path)
    written = json.loads((tmp_path / "cline-data" / "settings" / "providers.json").read_text())
    shown = json.loads(dict(blocks("**Cline**"))["json"])
    assert shown == written
    command = dict(blocks("**Cline**"))["bash"]
    for flag in ("--data-dir", "--compaction off", "-c"):
        assert flag in command and flag.split()[0] in argv


def test_aider_settings_and_command(tmp_path):
    argv, env = recipe("aider", tmp_path)
    found = dict(blocks("**Aider**"))
    assert yaml.safe_load(found["yaml"]) == yaml.safe_load((tmp_path / "aider-models.yml").read_text())
    for flag in ("--model openai/smollm2", "--model-settings-file", "--no-git", "--no-check-update",
                 "--no-analytics", "--message"):
        assert flag in found["bash"] and flag.split()[0] in argv
    for key in ("OPENAI_API_BASE", "LITELLM_LOCAL_MODEL_COST_MAP"):
        assert f"{key}={env[key]}" in found["bash"]


@pytest.mark.parametrize("name", ["llm"])
def test_llm_models_file(tmp_path, name):
    argv, _ = recipe(name, tmp_path)
    shown = yaml.safe_load(dict(blocks("**llm**"))["yaml"])
    assert shown == yaml.safe_load((tmp_path / "llm-user" / "extra-openai-models.yaml").read_text())
    assert "-o max_tokens 512" in README[README.index("**llm**"):] and "max_tokens" in argv
