"""Fill-in-the-middle (FIM) prompts, rendered by the gateway (pure).

vLLM 0.32 answers ``suffix`` on ``/v1/completions`` with a 400 for every model but DeepSeek-V4, so
the gateway turns ``prompt`` + ``suffix`` into the model family's own FIM prompt and sends that as a
plain prompt, with the family's stop tokens as ``stop_token_ids`` (vLLM strips special tokens before
it matches stop *strings*, so a special token given as a string never stops anything).

The published formats (``{prefix}``/``{suffix}`` are the text before and after the cursor):

==============  =================================================================  ==================
family          prompt                                                             source
==============  =================================================================  ==================
``starcoder``   ``<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>``            StarCoder/2, Granite code, SantaCoder
``qwen``        ``<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>``      Qwen2.5-Coder model card
``codellama``   ``<PRE> {prefix} <SUF>{suffix} <MID>``                              Meta's ``infilling_prompt_tokens``
``deepseek``    ``<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>``      DeepSeek-Coder model card
``codestral``   ``[SUFFIX]{suffix}[PREFIX]{prefix}``                                mistral-common's FIM request
``codegemma``   ``<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>``      CodeGemma model card
==============  =================================================================  ==================

Repository context (llama.cpp's ``input_extra``: other files as ``{filename, text}``) goes before
the FIM prompt as llama.cpp lays it out: the repository token and ``<name>\\n`` (families that have
one), then per file the file-separator token, ``<filename>\\n`` and its text, then the separator and
the current file's name; families without a file separator get the files as plain text, each after
a ``\\n\\n--- snippet ---\\n\\n`` line.

Which family a model is comes from its tokenizer's special tokens (:func:`detect`), or from the
per-model ``fim`` setting (:func:`configured`).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Mapping, Sequence

from server.modelfiles import ModelFiles


@dataclass(frozen=True)
class Family:
    """One FIM format. ``template`` uses ``{prefix}``, ``{suffix}`` and the token roles of
    ``roles`` (each role: the token's possible spellings, first found wins). ``stops`` are the
    tokens that end a completion besides the tokenizer's end-of-sequence token."""

    name: str
    template: str
    roles: Mapping[str, tuple[str, ...]]
    stops: tuple[str, ...]
    repo: tuple[str, ...] = ()
    file_sep: tuple[str, ...] = ()


_STAR = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
_QWEN = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
_DEEPSEEK = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")
_PSM = "{pre}{prefix}{suf}{suffix}{mid}"

# Most specific first: CodeGemma shares Qwen's FIM tokens and is told apart by its file separator.
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("deepseek", _PSM, dict(zip(("pre", "suf", "mid"), ((t,) for t in _DEEPSEEK))),
           stops=("<｜end▁of▁sentence｜>", "<|EOT|>", *_DEEPSEEK)),
    Family("codestral", "{suf}{suffix}{pre}{prefix}", {"pre": ("[PREFIX]",), "suf": ("[SUFFIX]",)},
           stops=("</s>", "[PREFIX]", "[SUFFIX]", "[MIDDLE]")),
    Family("codellama", "{pre} {prefix} {suf}{suffix} {mid}",
           {"pre": ("▁<PRE>", "<PRE>"), "suf": ("▁<SUF>", "<SUF>"), "mid": ("▁<MID>", "<MID>")},
           stops=("▁<EOT>", "<EOT>", "</s>")),
    Family("codegemma", _PSM, {**dict(zip(("pre", "suf", "mid"), ((t,) for t in _QWEN))),
                               "sep": ("<|file_separator|>",)},
           stops=("<|file_separator|>", *_QWEN, "<eos>", "<end_of_turn>"),
           file_sep=("<|file_separator|>",)),
    Family("qwen", _PSM, dict(zip(("pre", "suf", "mid"), ((t,) for t in _QWEN))),
           stops=("<|endoftext|>", *_QWEN, "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
                  "<|im_start|>", "<|im_end|>"),
           repo=("<|repo_name|>",), file_sep=("<|file_sep|>",)),
    Family("starcoder", _PSM, dict(zip(("pre", "suf", "mid"), ((t,) for t in _STAR))),
           stops=("<|endoftext|>", *_STAR, "<fim_pad>", "<file_sep>", "<repo_name>"),
           repo=("<repo_name>", "<reponame>"), file_sep=("<file_sep>",)),
)}
SNIPPET_SEPARATOR = "\n\n--- snippet ---\n\n"
DEFAULT_REPO_NAME = "myproject"  # what llama.cpp's /infill writes after the repository token
DEFAULT_FILENAME = "filename"


@dataclass(frozen=True)
class ExtraFile:
    """One file of repository context (llama.cpp's ``input_extra`` item)."""

    filename: str
    text: str


@dataclass(frozen=True)
class Fim:
    """A model's FIM format, resolved against its tokenizer: ``tokens`` maps each role of the
    template to the token text the tokenizer really has; ``stop_token_ids`` are the ids of the
    stop tokens it has (for vLLM's ``stop_token_ids``); ``stop`` holds configured stops that are
    not tokens (plain stop strings)."""

    family: str
    template: str
    tokens: Mapping[str, str]
    stop_token_ids: tuple[int, ...]
    stop: tuple[str, ...] = ()
    repo: str | None = None
    file_sep: str | None = None

    def render(self, prefix: str, suffix: str, extra: Sequence[ExtraFile] = (),
               repo_name: str | None = None, filename: str | None = None) -> str:
        """The prompt for ``prefix`` + ``suffix`` (with ``extra`` files of context), as text."""
        return self._context(extra, repo_name, filename) + fill(self.template, self.tokens,
                                                                prefix, suffix)

    def _context(self, extra: Sequence[ExtraFile], repo_name: str | None,
                 filename: str | None) -> str:
        if not extra and filename is None:
            return ""
        if self.file_sep is None:
            return "".join(SNIPPET_SEPARATOR + f.text for f in extra)
        out = f"{self.repo}{repo_name or DEFAULT_REPO_NAME}\n" if self.repo else ""
        out += "".join(f"{self.file_sep}{f.filename}\n{f.text}" for f in extra)
        return out + f"{self.file_sep}{filename or DEFAULT_FILENAME}\n"


def fill(template: str, tokens: Mapping[str, str], prefix: str, suffix: str) -> str:
    """``template`` with ``{prefix}``, ``{suffix}`` and its token roles filled in (``{{``/``}}``
    are literal braces). A token spelled with sentencepiece's word-start mark ``▁`` carries its
    own leading space, so one literal space right before it is dropped (CodeLlama's ``▁<SUF>``
    is " <SUF>"). Raises ``KeyError`` for a role that ``tokens`` lacks."""
    out: list[str] = []
    values = {"prefix": prefix, "suffix": suffix}
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is None:
            continue
        if name in values:
            out.append(values[name])
            continue
        token = tokens[name]
        if token.startswith("▁") and out and out[-1].endswith(" "):
            out[-1] = out[-1][:-1]
        out.append(token)
    return "".join(out)


def _first(files: ModelFiles, spellings: tuple[str, ...]) -> str | None:
    return next((s for s in spellings if files.token_id(s) is not None), None)


def resolve(family: Family, files: ModelFiles, extra_stops: Sequence[str] = ()) -> Fim | None:
    """``family`` bound to the tokens ``files`` has; ``None`` when a role's token is missing."""
    tokens = {role: _first(files, spellings) for role, spellings in family.roles.items()}
    if any(t is None for t in tokens.values()):
        return None
    ids, _ = stop_ids(files, family.stops)
    more, plain = stop_ids(files, extra_stops, keep=True)
    return Fim(family.name, family.template, tokens, tuple(dict.fromkeys(ids + more)), plain,
               repo=_first(files, family.repo), file_sep=_first(files, family.file_sep))


def stop_ids(files: ModelFiles, stops: Sequence[str],
             keep: bool = False) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Split ``stops`` into the ids of those that are tokens and the rest, which are kept as plain
    stop strings when ``keep`` (configured stops) and dropped otherwise (a family's tokens that
    this tokenizer lacks). The end-of-sequence token is left out: vLLM stops on it by itself,
    and as a stop token id it would defeat a client's ``ignore_eos``."""
    ids: list[int] = []
    plain: list[str] = []
    for text in stops:
        if text == files.eos:
            continue
        tid = files.token_id(text)
        if tid is not None:
            if tid not in ids:
                ids.append(tid)
        elif keep and text not in plain:
            plain.append(text)
    return tuple(ids), tuple(plain)


def detect(files: ModelFiles) -> Fim | None:
    """The FIM format whose tokens ``files``' tokenizer carries (the most specific family
    first), or ``None``: the model has no FIM tokens and ``suffix`` is refused."""
    for family in FAMILIES.values():
        fim = resolve(family, files)
        if fim is not None:
            return fim
    return None


def configured(template: str, stops: Sequence[str], files: ModelFiles) -> Fim:
    """The per-model ``fim`` setting: ``template`` is a family name of :data:`FAMILIES` (its
    tokens looked up in the tokenizer, spelled as published when the tokenizer is not on disk)
    or a format string with ``{prefix}`` and ``{suffix}``; ``stops`` are added to the family's.
    Raises ``ValueError`` when a format string lacks ``{prefix}`` or ``{suffix}``."""
    family = FAMILIES.get(template)
    if family is not None:
        found = resolve(family, files, stops)
        if found is not None:
            return found
        tokens = {role: spellings[-1] if family.name == "codellama" else spellings[0]
                  for role, spellings in family.roles.items()}
        ids, plain = stop_ids(files, stops, keep=True)
        return Fim(family.name, family.template, tokens, ids, plain,
                   repo=family.repo[0] if family.repo else None,
                   file_sep=family.file_sep[0] if family.file_sep else None)
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    if not {"prefix", "suffix"} <= fields or fields - {"prefix", "suffix"}:
        raise ValueError("a FIM template needs {prefix} and {suffix} and no other {field} "
                         f"(or one of {', '.join(FAMILIES)}), got {template!r}")
    ids, plain = stop_ids(files, stops, keep=True)
    return Fim("custom", template, {}, ids, plain)
