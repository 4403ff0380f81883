"""Which vLLM tool-call parser a generation model gets (pure).

vLLM answers any request with ``tools`` with a 400 unless its engine runs with
``--enable-auto-tool-choice --tool-call-parser P``, and each parser reads one family's way of
writing a call. The family comes from the model's own files first (the special tokens and the chat
template it ships), then from its name, then ``hermes``: its ``<tool_call>`` JSON needs no special
token, so it starts on any tokenizer, and it is what ChatML models (SmolLM2, Qwen2.5, Hermes) write.

The rules follow vLLM's tool-calling documentation (``docs/features/tool_calling.md``: which parser
each model family needs).
"""

from __future__ import annotations

import re

from server.modelfiles import ModelFiles

DEFAULT_PARSER = "hermes"

# (parser, every token/template marker that must be present), most specific first.
_FILE_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("openai", ("<|channel|>", "<|start|>")),                 # gpt-oss (harmony format)
    ("llama4_pythonic", ("<|header_start|>",)),               # Llama 4
    ("llama3_json", ("<|python_tag|>",)),                     # Llama 3.1 / 3.2 / 3.3
    ("mistral", ("[TOOL_CALLS]",)),                           # Mistral, Mixtral, Ministral
    ("deepseek_v3", ("<｜tool▁calls▁begin｜>", "```json")),   # DeepSeek-V3 / R1
    ("deepseek_v31", ("<｜tool▁calls▁begin｜>",)),            # DeepSeek-V3.1
    ("kimi_k2", ("<|tool_calls_section_begin|>",)),           # Kimi K2
    ("minimax_m2", ("<minimax:tool_call>",)),                 # MiniMax M2
    ("glm45", ("<|observation|>", "[gMASK]")),                # GLM-4.5 / 4.6
    ("internlm", ("<|action_start|>", "<|plugin|>")),         # InternLM2.5
    ("granite", ("<|start_of_role|>", "<|tool_call|>")),      # Granite 3.x
    ("granite4", ("<|start_of_role|>", "<tool_call>")),       # Granite 4
    ("phi4_mini_json", ("<|tool|>", "<|tool_call|>")),        # Phi-4-mini
    ("functiongemma", ("<start_function_call>",)),            # FunctionGemma
    ("qwen3_coder", ("<tool_call>", "<function=")),           # Qwen3-Coder (XML arguments)
    ("hermes", ("<tool_call>",)),                             # Hermes, Qwen2.5/3, SmolLM2 + ours
    ("hermes", ("<|im_start|>",)),                            # any other ChatML model
)

# (parser, pattern on the lower-cased served name, path and model type), when the files say nothing.
_NAME_RULES: tuple[tuple[str, str], ...] = (
    ("openai", r"gpt-oss"),
    ("llama4_pythonic", r"llama-?4"),
    ("llama3_json", r"llama-?3"),
    ("mistral", r"mistral|mixtral|ministral|codestral|devstral|magistral"),
    ("qwen3_coder", r"qwen3-coder"),
    ("hermes", r"qwen|hermes|smollm"),
    ("deepseek_v31", r"deepseek-v3\.1"),
    ("deepseek_v3", r"deepseek-(v3|r1)"),
    ("kimi_k2", r"kimi-k2"),
    ("glm45", r"glm-4\.[56]"),
    ("granite4", r"granite-4"),
    ("granite", r"granite"),
    ("internlm", r"internlm"),
    ("phi4_mini_json", r"phi-4-mini"),
)


def detect(files: ModelFiles, *names: str) -> str:
    """The parser for a model with ``files`` (tokens, chat template) known by ``names`` (served
    name, path, …): the first file rule whose markers all appear among the special tokens or in
    the chat template, else the first name rule that matches, else :data:`DEFAULT_PARSER`."""
    def present(marker: str) -> bool:
        return files.token_id(marker) is not None or marker in files.chat_template

    for parser, markers in _FILE_RULES:
        if all(present(m) for m in markers):
            return parser
    haystack = " ".join((*names, files.model_type)).lower()
    for parser, pattern in _NAME_RULES:
        if re.search(pattern, haystack):
            return parser
    return DEFAULT_PARSER


def from_engine_args(engine_args: tuple[str, ...]) -> str | None:
    """The ``--tool-call-parser`` a model's own ``engine_args`` set (they win), else ``None``."""
    for i, arg in enumerate(engine_args):
        if arg == "--tool-call-parser" and i + 1 < len(engine_args):
            return engine_args[i + 1]
        if arg.startswith("--tool-call-parser="):
            return arg.split("=", 1)[1]
    return None
