"""What the gateway reads from a model's own files: its special tokens, chat template and config.

Read once per model (at start and on a reload, in a thread), never per request. The decisions that
use these facts (which tool-call parser, which FIM format) are pure functions in ``families.py``.

Where the files are: the model's ``path`` when it is a folder; for a Hugging Face id, the snapshot
in the local Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``) if vLLM or anyone downloaded it before. Otherwise nothing is known
(:data:`UNKNOWN`) and the decisions fall back to the model's name.

Tokens come from ``tokenizer.json`` (``added_tokens``, and the vocabulary for the few FIM pieces
that some tokenizers keep there, such as CodeLlama's ``▁<PRE>``) and ``tokenizer_config.json``
(``added_tokens_decoder``, ``eos_token``, ``chat_template``); the chat template also from
``chat_template.jinja`` (or ``chat_template.json``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

# Vocabulary pieces worth looking up although they are not "added" tokens (CodeLlama's FIM
# tokens live in its sentencepiece vocabulary, with the word-start mark ▁).
VOCAB_PROBES = ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>", "<PRE>", "<SUF>", "<MID>", "<EOT>")
_MAX_TOKENIZER_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ModelFiles:
    """Facts from one model's files. ``tokens`` maps token text → id for every added/special
    token (and the :data:`VOCAB_PROBES` found in the vocabulary); ``eos`` is the end-of-sequence
    token's text; ``chat_template`` the template text ('' when none); ``model_type`` and
    ``architectures`` come from ``config.json``. ``folder`` is where they were read (``None``:
    nothing was found)."""

    folder: Path | None = None
    tokens: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    eos: str | None = None
    chat_template: str = ""
    model_type: str = ""
    architectures: tuple[str, ...] = ()

    def token_id(self, text: str) -> int | None:
        """The id of the token spelled ``text``, or ``None`` when the tokenizer has no such token."""
        return self.tokens.get(text)


UNKNOWN = ModelFiles()


def hub_cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    """The local Hugging Face hub cache, as ``huggingface_hub`` resolves it."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    home = Path(env["HF_HOME"]).expanduser() if env.get("HF_HOME") else Path.home() / ".cache" / "huggingface"
    return home / "hub"


def model_folder(path: str, cache: Path | None = None) -> Path | None:
    """The folder holding the model's files: ``path`` itself when it is a folder, else the cached
    snapshot of the hub id ``path`` (``org/name``) that ``refs/main`` points to; ``None`` if neither."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if path.count("/") != 1 or path.startswith(("/", ".", "~")):
        return None
    repo = (cache or hub_cache_dir()) / ("models--" + path.replace("/", "--"))
    try:
        rev = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snap = repo / "snapshots" / rev
    return snap if snap.is_dir() else None


def _json(path: Path) -> Any:
    try:
        if path.stat().st_size > _MAX_TOKENIZER_BYTES:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def _token_text(value: Any) -> str | None:
    """``eos_token`` as written in tokenizer_config.json: a string or ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _template(folder: Path, tok_config: dict[str, Any]) -> str:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return ""
    raw = tok_config.get("chat_template")
    if raw is None:
        doc = _json(folder / "chat_template.json")
        raw = doc.get("chat_template") if isinstance(doc, dict) else None
    if isinstance(raw, list):  # named templates: [{"name": "default", "template": "..."}]
        named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
        raw = named.get("default") or next(iter(named.values()), "")
    return raw if isinstance(raw, str) else ""


def parse_tokens(tokenizer: Any, tok_config: dict[str, Any]) -> dict[str, int]:
    """Token text → id from parsed ``tokenizer.json`` and ``tokenizer_config.json`` (pure)."""
    tokens: dict[str, int] = {}
    if isinstance(tokenizer, dict):
        added = tokenizer.get("added_tokens")
        for item in added if isinstance(added, list) else []:
            if isinstance(item, dict) and isinstance(item.get("content"), str) and isinstance(
                    item.get("id"), int):
                tokens[item["content"]] = item["id"]
        model = tokenizer.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, dict):
            tokens.update({p: vocab[p] for p in VOCAB_PROBES if isinstance(vocab.get(p), int)})
        elif isinstance(vocab, list):  # unigram: [[piece, score], ...], the index is the id
            probes = set(VOCAB_PROBES)
            tokens.update({e[0]: i for i, e in enumerate(vocab)
                           if isinstance(e, list) and e and isinstance(e[0], str) and e[0] in probes})
    decoder = tok_config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for key, item in decoder.items():
            if isinstance(item, dict) and isinstance(item.get("content"), str) and key.isdigit():
                tokens.setdefault(item["content"], int(key))
    return tokens


def read_model_files(path: str, cache: Path | None = None) -> ModelFiles:
    """Read the facts of the model at ``path`` (a folder or a cached hub id); :data:`UNKNOWN` when
    no folder is found. Files that are missing, unreadable or not shaped as expected count as
    empty (``ModelFiles(folder)``); never raises."""
    try:
        folder = model_folder(path, cache)
    except (OSError, ValueError):  # a path with a NUL byte, say
        return UNKNOWN
    if folder is None:
        return UNKNOWN
    try:
        return _read(folder)
    except (TypeError, AttributeError, ValueError, RecursionError):  # a file of an odd shape
        return ModelFiles(folder=folder)


def _read(folder: Path) -> ModelFiles:
    tok_config = _json(folder / "tokenizer_config.json")
    tok_config = tok_config if isinstance(tok_config, dict) else {}
    config = _json(folder / "config.json")
    config = config if isinstance(config, dict) else {}
    tokens = parse_tokens(_json(folder / "tokenizer.json"), tok_config)
    archs = config.get("architectures")
    return ModelFiles(
        folder=folder, tokens=MappingProxyType(tokens), eos=_token_text(tok_config.get("eos_token")),
        chat_template=_template(folder, tok_config), model_type=str(config.get("model_type") or ""),
        architectures=tuple(a for a in archs if isinstance(a, str)) if isinstance(archs, list) else ())
