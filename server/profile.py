"""A model's profile: what vramgate derives from its configuration and its own files (pure, apart
from :func:`read_profiles`), once per model at start and on a reload, never per request.

- ``tool_parser``: vLLM's tool-call parser for its engine (``server.toolparser``), ``None`` for an
  embedding model or ``tool_parser: none``.
- ``fim``: its FIM format (``server.fim``), ``None`` when it has no FIM tokens (``suffix`` → 400).
- ``files``: the special tokens and chat template read from disk (``server.modelfiles``), for
  turning stop strings that are special tokens into ``stop_token_ids``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from server import fim as fimlib
from server import toolparser
from server.config import ModelConfig
from server.modelfiles import UNKNOWN, ModelFiles, read_model_files


@dataclass(frozen=True)
class Profile:
    """See the module docstring. ``tool_parser_source`` says where the parser came from:
    ``config`` (``tool_parser`` or ``engine_args``), ``files`` or ``name`` (detected)."""

    files: ModelFiles
    tool_parser: str | None
    tool_parser_source: str
    fim: fimlib.Fim | None


def profile(model: ModelConfig, files: ModelFiles) -> Profile:
    """The profile of ``model`` given its ``files`` (:data:`~server.modelfiles.UNKNOWN` when
    none are on disk). Raises ``ValueError`` for a ``fim`` format string without its fields."""
    parser, source = None, "config"
    if model.task == "generate":
        configured = toolparser.from_engine_args(model.engine_args) or model.tool_parser
        if configured == "none":
            parser = None
        elif configured:
            parser = configured
        else:
            parser = toolparser.detect(files, model.name, model.path)
            source = "files" if files.folder is not None else "name"
    fim = None
    if model.task == "generate" and model.fim_template != "none":
        fim = (fimlib.configured(model.fim_template, model.fim_stop, files) if model.fim_template
               else fimlib.detect(files))
    return Profile(files, parser, source, fim)


def read_files(model: ModelConfig) -> ModelFiles:
    """``model``'s files as its engine will see them: a configured ``chat_template`` replaces
    the one in the model's folder (I/O)."""
    if model.task != "generate" or not model.path:  # no files here: served by upstreams only
        return UNKNOWN
    files = read_model_files(model.path)
    if model.chat_template:
        try:
            text = Path(model.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = ""
        files = dataclasses.replace(files, chat_template=text)
    return files


def read_profiles(models: Iterable[ModelConfig]) -> dict[str, Profile]:
    """Every model's profile, reading its files (I/O: run it in a thread on a server). Raises
    ``ValueError`` as :func:`profile` does."""
    return {m.name: profile(m, read_files(m)) for m in models}
