"""The real agent CLIs, run non-interactively against a gateway (recipes for the e2e suite).

Each recipe writes the client's configuration under a fresh ``HOME`` in a temporary folder, points it
at the gateway with a dummy key, turns off its update checks and telemetry, and runs it with stdin
closed (codex, cline and llm read an open stdin as more prompt) in its own process group, which is
killed afterwards with anything else carrying the run's marker (codex and cline wrap native
binaries; cline can leave a hub daemon). Anything that is not loopback goes to a dead proxy, and the
Continue CLI, whose Node ``fetch`` ignores proxies, gets ``no-egress.cjs`` preloaded.

Installed by ``scripts/install-clients.sh`` under ``$VRAMGATE_CLIENTS_DIR`` (default
``~/.cache/vramgate/clients``). The configurations here are the README's snippets, made testable.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DIR = Path(os.environ.get("VRAMGATE_CLIENTS_DIR", Path.home() / ".cache" / "vramgate" / "clients"))
NO_EGRESS = Path(__file__).with_name("no-egress.cjs")
CONTEXT = 8192
MAX_TOKENS = 512  # the output budget each client is told to ask for, where it can be told
KEY = "sk-unused"
DEAD_PROXY = "http://127.0.0.1:9"
NAMES = ("claude", "codex", "cn", "cline", "aider", "llm")
# The route each client uses, and whether it sends tools with this recipe.
ROUTE = {"claude": "/v1/messages", "codex": "/v1/responses", "cn": "/v1/chat/completions",
         "cline": "/v1/chat/completions", "aider": "/v1/chat/completions",
         "llm": "/v1/chat/completions"}
SENDS_TOOLS = {"claude", "codex", "cn", "cline"}
_CLINE_TEAM = ("spawn_teammate shutdown_teammate status task run_task cancel_run list_runs "
               "await_runs send_message broadcast read_mailbox mission_log cleanup create_outcome "
               "attach_outcome_fragment review_outcome_fragment finalize_outcome list_outcomes")


def executable(name: str) -> Path:
    """Where ``scripts/install-clients.sh`` put client ``name``'s command."""
    if name in ("aider", "llm"):
        return DIR / "py" / name / "bin" / name
    return DIR / "npm" / name / "node_modules" / ".bin" / name


@dataclass
class Run:
    """One client run: its exit status, seconds, output, and the processes killed afterwards."""

    name: str
    rc: int
    seconds: float
    stdout: str
    stderr: str
    leftovers: list[int]


def _env(home: Path, marker: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
            "TERM": "dumb", "NO_COLOR": "1", "CI": "1", "DO_NOT_TRACK": "1",
            "VRAMGATE_CLIENT_RUN": marker,
            **{k: DEAD_PROXY for k in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy",
                                        "http_proxy", "all_proxy")},
            "NO_PROXY": "127.0.0.1,localhost,::1", "no_proxy": "127.0.0.1,localhost,::1"}


def _claude(url: str, model: str, base: Path, env: dict) -> list[str]:
    env.update({
        "ANTHROPIC_BASE_URL": url, "ANTHROPIC_API_KEY": KEY, "ANTHROPIC_MODEL": model,
        "ANTHROPIC_SMALL_FAST_MODEL": model, "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
        "ANTHROPIC_DEFAULT_SONNET_MODEL": model, "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
        "CLAUDE_CODE_SUBAGENT_MODEL": model, "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(MAX_TOKENS),
        "MAX_THINKING_TOKENS": "0", "DISABLE_COMPACT": "1",
        "CLAUDE_CODE_MAX_CONTEXT_TOKENS": str(CONTEXT),
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1", "CLAUDE_CODE_MAX_RETRIES": "0",
        "API_TIMEOUT_MS": "600000"})
    # --bare: no hooks, plugins or CLAUDE.md, and not the default 12k-token agent prompt, which
    # is larger than the embedded model's 8,192-token context; two tools stay.
    return [str(executable("claude")), "-p", "--model", model, "--no-session-persistence", "--bare",
            "--tools", "Read,Bash", "--system-prompt", "You are a helpful assistant. Answer briefly."]


def _codex(url: str, model: str, base: Path, env: dict) -> list[str]:
    home = base / "codex-home"
    home.mkdir(parents=True, exist_ok=True)
    (base / "codex-instructions.md").write_text("You are a helpful assistant. Answer briefly.\n")
    features = ("plugins remote_plugin apps goals tool_suggest shell_snapshot image_generation "
                "view_image skill_search api_key_model_discovery").split()
    (home / "config.toml").write_text(f'''model = "{model}"
model_provider = "vramgate"
approval_policy = "never"
sandbox_mode = "read-only"
check_for_update_on_startup = false
web_search = "disabled"
model_context_window = {CONTEXT}
model_auto_compact_token_limit = {CONTEXT - 1024}
model_reasoning_summary = "none"
project_doc_max_bytes = 0
model_instructions_file = "{base / 'codex-instructions.md'}"

[analytics]
enabled = false

[feedback]
enabled = false

[agents]
enabled = false

[features]
{chr(10).join(f"{f} = false" for f in features)}

[model_providers.vramgate]
name = "vramgate"
base_url = "{url}/v1"
wire_api = "responses"
env_key = "VRAMGATE_API_KEY"
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = 600000
''')
    env.update({"CODEX_HOME": str(home), "VRAMGATE_API_KEY": KEY})
    return [str(executable("codex")), "exec", "--strict-config", "--skip-git-repo-check",
            "--ephemeral", "--color", "never", "-C", str(base / "work")]


def _cn(url: str, model: str, base: Path, env: dict) -> list[str]:
    config = base / "continue.yaml"
    config.write_text(f'''name: vramgate
version: 1.0.0
schema: v1
models:
  - name: {model}
    provider: openai
    model: {model}
    apiBase: {url}/v1
    apiKey: {KEY}
    roles: [chat, edit, apply]
    defaultCompletionOptions:
      maxTokens: {MAX_TOKENS}
      contextLength: {CONTEXT}
''')
    env.update({"CONTINUE_GLOBAL_DIR": str(base / "home" / ".continue"),
                "CONTINUE_CLI_ENABLE_TELEMETRY": "0", "CONTINUE_METRICS_ENABLED": "0",
                "NODE_OPTIONS": f"--require {NO_EGRESS}"})  # its update check ignores proxies
    return [str(executable("cn")), "-p", "--config", str(config)]


def _cline(url: str, model: str, base: Path, env: dict) -> list[str]:
    settings = base / "cline-data" / "settings"
    settings.mkdir(parents=True, exist_ok=True)
    # Every key is needed: without "modes", "updatedAt" and "tokenSource" cline silently falls
    # back to its own cloud provider.
    (settings / "providers.json").write_text(json.dumps({
        "version": 1, "lastUsedProvider": "openai-compatible", "modes": {},
        "providers": {"openai-compatible": {
            "settings": {"provider": "openai-compatible", "apiKey": KEY, "model": model,
                         "baseUrl": f"{url}/v1", "contextWindow": CONTEXT},
            "updatedAt": "2026-01-01T00:00:00.000Z", "tokenSource": "manual"}}}))
    (settings / "global-settings.json").write_text(json.dumps({
        "telemetryOptOut": True, "autoUpdateEnabled": False, "compactionEnabled": False,
        "disabledTools": ["spawn_agent", "fetch_web_content", *(f"team_{t}" for t in _CLINE_TEAM.split())]}))
    env["CLINE_GLOBAL_SETTINGS_PATH"] = str(settings / "global-settings.json")
    # --data-dir, not $CLINE_DATA_DIR: the variable starts a hub daemon and the run never ends.
    return [str(executable("cline")), "--data-dir", str(settings.parent), "--compaction", "off",
            "-c", str(base / "work")]


def _aider(url: str, model: str, base: Path, env: dict) -> list[str]:
    (base / "aider-models.yml").write_text(f'''- name: openai/{model}
  edit_format: whole
  use_repo_map: false
  extra_params:
    max_tokens: {MAX_TOKENS}
''')
    (base / "aider-metadata.json").write_text(json.dumps({f"openai/{model}": {
        "max_input_tokens": CONTEXT, "max_output_tokens": MAX_TOKENS, "max_tokens": CONTEXT,
        "input_cost_per_token": 0.0, "output_cost_per_token": 0.0, "litellm_provider": "openai",
        "mode": "chat"}}))
    env.update({"OPENAI_API_BASE": f"{url}/v1", "OPENAI_API_KEY": KEY,
                "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    return [str(executable("aider")), "--model", f"openai/{model}",
            "--model-settings-file", str(base / "aider-models.yml"),
            "--model-metadata-file", str(base / "aider-metadata.json"), "--yes-always", "--no-git",
            "--no-check-update", "--no-analytics", "--no-show-model-warnings",
            "--no-show-release-notes", "--no-pretty", "--no-fancy-input", "--map-tokens", "0",
            "--no-restore-chat-history", "--chat-history-file", "/dev/null",
            "--input-history-file", "/dev/null", "--no-detect-urls", "--no-suggest-shell-commands",
            "--timeout", "600", "--message"]


def _llm(url: str, model: str, base: Path, env: dict) -> list[str]:
    user = base / "llm-user"
    user.mkdir(parents=True, exist_ok=True)
    (user / "extra-openai-models.yaml").write_text(
        f'- model_id: {model}\n  model_name: {model}\n  api_base: "{url}/v1"\n')
    env["LLM_USER_PATH"] = str(user)
    return [str(executable("llm")), "-m", model, "-o", "max_tokens", str(MAX_TOKENS), "-n"]


RECIPES = {"claude": _claude, "codex": _codex, "cn": _cn, "cline": _cline, "aider": _aider,
           "llm": _llm}


def _kill_marked(marker: str) -> list[int]:
    """SIGKILL every process whose environment carries this run's marker; returns their pids."""
    needle = f"VRAMGATE_CLIENT_RUN={marker}".encode()
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    os.kill(int(entry), signal.SIGKILL)
                    killed.append(int(entry))
        except OSError:
            pass
    return killed


def run(name: str, url: str, model: str, prompt: str, base: Path, timeout: float = 600) -> Run:
    """Run client ``name`` once against the gateway at ``url`` with ``prompt``."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "work").mkdir(exist_ok=True)
    (base / "home").mkdir(exist_ok=True)
    marker = uuid.uuid4().hex
    env = _env(base / "home", marker)
    argv = RECIPES[name](url, model, base, env) + [prompt]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=base / "work", stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    seconds = time.monotonic() - t0
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return Run(name, proc.returncode, seconds, out.decode("utf-8", "replace"),
               err.decode("utf-8", "replace"), _kill_marked(marker))
