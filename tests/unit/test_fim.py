"""FIM formats against the published ones, detection from tokenizer tokens, and the request
rewrites (suffix, stop tokens, output budget, /infill)."""

from __future__ import annotations

import json
from types import MappingProxyType

import pytest

from server import fim, infill
from server.errors import InvalidRequest
from server.modelfiles import ModelFiles, parse_tokens
from server.rewrite import fim_completion, fit_output, special_stops

# Each family's tokens as its tokenizer spells them (ids are arbitrary but distinct).
TOKENS = {
    "starcoder": ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>",
                  "<repo_name>", "<file_sep>"],
    "qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>",
             "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"],
    "codellama": ["<s>", "</s>", "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"],
    "deepseek": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>",
                 "<｜fim▁begin｜>", "<｜fim▁end｜>", "<|EOT|>"],
    "codestral": ["<s>", "</s>", "[PREFIX]", "[MIDDLE]", "[SUFFIX]"],
    "codegemma": ["<bos>", "<eos>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                  "<|file_separator|>", "<end_of_turn>"],
}
EOS = {"starcoder": "<|endoftext|>", "qwen": "<|endoftext|>", "codellama": "</s>",
       "deepseek": "<｜end▁of▁sentence｜>", "codestral": "</s>", "codegemma": "<eos>"}
PUBLISHED = {
    "starcoder": "<fim_prefix>def f(x):\n    <fim_suffix>\n    return y<fim_middle>",
    "qwen": "<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return y<|fim_middle|>",
    "codellama": "▁<PRE> def f(x):\n    ▁<SUF>\n    return y▁<MID>",
    "deepseek": "<｜fim▁begin｜>def f(x):\n    <｜fim▁hole｜>\n    return y<｜fim▁end｜>",
    "codestral": "[SUFFIX]\n    return y[PREFIX]def f(x):\n    ",
    "codegemma": "<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return y<|fim_middle|>",
}
PREFIX, SUFFIX = "def f(x):\n    ", "\n    return y"


def files_for(family: str, **kw) -> ModelFiles:
    tokens = {t: 1000 + i for i, t in enumerate(TOKENS[family])}
    return ModelFiles(tokens=MappingProxyType(tokens), eos=EOS[family], **kw)


@pytest.mark.parametrize("family", sorted(TOKENS))
def test_each_family_is_detected_and_renders_its_published_format(family):
    files = files_for(family)
    found = fim.detect(files)
    assert found is not None and found.family == family
    assert found.render(PREFIX, SUFFIX) == PUBLISHED[family]
    # The family's own stops are token ids, never strings; the end-of-sequence token is vLLM's
    # own business (so that ignore_eos still works).
    assert found.stop_token_ids and files.token_id(EOS[family]) not in found.stop_token_ids
    assert found.stop == ()
    assert set(found.stop_token_ids) <= set(files.tokens.values())


def test_codellama_with_plain_token_spellings_keeps_the_published_spaces():
    files = ModelFiles(tokens=MappingProxyType({"<PRE>": 1, "<SUF>": 2, "<MID>": 3, "<EOT>": 4}))
    assert fim.detect(files).render("a", "b") == "<PRE> a <SUF>b <MID>"


def test_no_fim_tokens_means_no_fim():
    smollm2 = ModelFiles(tokens=MappingProxyType({"<|im_start|>": 1, "<|im_end|>": 2,
                                                  "<repo_name>": 3, "<file_sep>": 4}))
    assert fim.detect(smollm2) is None


def test_repository_context_follows_llama_cpp():
    extra = [fim.ExtraFile("a.py", "A = 1\n"), fim.ExtraFile("b.py", "B = 2\n")]
    qwen = fim.detect(files_for("qwen"))
    assert qwen.render("x", "y", extra) == (
        "<|repo_name|>myproject\n<|file_sep|>a.py\nA = 1\n<|file_sep|>b.py\nB = 2\n"
        "<|file_sep|>filename\n<|fim_prefix|>x<|fim_suffix|>y<|fim_middle|>")
    star = fim.detect(files_for("starcoder"))
    assert star.render("x", "y", extra[:1], repo_name="r", filename="c.py") == (
        "<repo_name>r\n<file_sep>a.py\nA = 1\n<file_sep>c.py\n<fim_prefix>x<fim_suffix>y<fim_middle>")
    deepseek = fim.detect(files_for("deepseek"))  # no file separator: plain snippets
    assert deepseek.render("x", "y", extra[:1]).startswith("\n\n--- snippet ---\n\nA = 1\n<｜fim▁begin｜>")


def test_configured_format_and_stops():
    files = files_for("starcoder")
    custom = fim.configured("<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>",
                            ["<file_sep>", "\n\n"], files)
    assert custom.render("a", "b") == "<fim_prefix>a<fim_suffix>b<fim_middle>"
    assert files.token_id("<file_sep>") in custom.stop_token_ids and custom.stop == ("\n\n",)
    # A family named for a model whose tokenizer is not on disk: the published spellings, and
    # the configured stops kept as strings (even those that are some family's token text).
    remote = fim.configured("codellama", [], ModelFiles())
    assert remote.render("a", "b") == "<PRE> a <SUF>b <MID>"
    offline = fim.configured("qwen", ["<|file_sep|>", "\n\n\n"], ModelFiles())
    assert offline.stop == ("<|file_sep|>", "\n\n\n") and offline.stop_token_ids == ()
    with pytest.raises(ValueError):
        fim.configured("{prefix} only", [], files)


def test_tokens_are_read_from_added_tokens_decoder_and_the_vocabulary():
    tokenizer = {"added_tokens": [{"id": 5, "content": "<fim_prefix>", "special": True}],
                 "model": {"vocab": {"▁<PRE>": 32007, "hello": 7}}}
    config = {"added_tokens_decoder": {"9": {"content": "<|im_end|>", "special": True}}}
    assert parse_tokens(tokenizer, config) == {"<fim_prefix>": 5, "▁<PRE>": 32007, "<|im_end|>": 9}


def test_suffix_becomes_the_family_prompt_with_stop_ids_and_a_budget():
    files = files_for("qwen")
    q = fim.detect(files)
    body = {"model": "coder", "prompt": PREFIX, "suffix": SUFFIX, "stop": ["<|file_sep|>", "\n\n"],
            "stream": True}
    out = fim_completion(body, "coder", q, files, 128)
    assert "suffix" not in out and out["prompt"] == PUBLISHED["qwen"]
    assert out["max_tokens"] == 128 and out["stream"] is True
    assert out["stop"] == ["\n\n"]  # the special-token stop moved to the ids
    assert files.token_id("<|file_sep|>") in out["stop_token_ids"]
    assert set(q.stop_token_ids) <= set(out["stop_token_ids"])
    assert fim_completion(dict(body, max_tokens=7), "coder", q, files, 128)["max_tokens"] == 7
    batch = fim_completion(dict(body, prompt=["a", "b"]), "coder", q, files, 128)
    assert len(batch["prompt"]) == 2 and batch["prompt"][1].startswith("<|fim_prefix|>b")


def test_suffix_on_a_model_without_fim_is_a_clear_400():
    with pytest.raises(InvalidRequest) as info:
        fim_completion({"prompt": "a", "suffix": "b"}, "SmolLM2-135M-Instruct", None, ModelFiles(), 128)
    err = info.value
    assert (err.status, err.code, err.param) == (400, "suffix_not_supported", "suffix")
    assert "SmolLM2-135M-Instruct" in err.message
    q = files_for("qwen")
    for bad in ({"prompt": [1, 2, 3], "suffix": "b"}, {"prompt": "a", "suffix": 3},
                {"prompt": "a", "suffix": "b", "input_extra": "x"}):
        with pytest.raises(InvalidRequest):
            fim_completion(bad, "m", fim.detect(q), q, 128)


def test_special_token_stop_strings_become_stop_token_ids():
    files = files_for("qwen")
    body = {"stop": "<|im_end|>", "stop_token_ids": [5]}
    assert special_stops(body, files) == {"stop": None, "stop_token_ids": [5, files.token_id("<|im_end|>")]}
    assert special_stops({"stop": ["END"]}, files) is None  # nothing to change: forwarded as is
    assert special_stops({"messages": []}, files) is None
    assert special_stops({"stop": "<|im_end|>"}, ModelFiles()) is None  # tokens unknown


def test_output_budget_is_lowered_to_the_context_on_every_route():
    for route, param in (("/v1/chat/completions", "max_tokens"),
                         ("/v1/chat/completions", "max_completion_tokens"),
                         ("/v1/completions", "max_tokens"), ("/v1/responses", "max_output_tokens"),
                         ("/v1/messages", "max_tokens")):
        for asked in (32000, "32000", 32000.0, " 32000 "):  # as vLLM's pydantic reads them
            body, note = fit_output({param: asked, "x": 1}, route, 8192)
            assert body == {param: 8192, "x": 1}
            assert note.header() == f"8192; requested=32000; param={param}"
    both, note = fit_output({"max_tokens": 9000, "max_completion_tokens": 20000}, "/v1/chat/completions", 8192)
    assert both == {"max_tokens": 8192, "max_completion_tokens": 8192}
    assert note.header() == "8192; requested=20000; param=max_tokens,max_completion_tokens"
    for odd in (32000.5, "lots", True, None, -5):
        assert fit_output({"max_tokens": odd}, "/v1/completions", 8192) == (None, None)
    assert fit_output({"max_tokens": 100}, "/v1/completions", 8192) == (None, None)
    assert fit_output({"max_tokens": 32000}, "/v1/completions", None) == (None, None)
    assert fit_output({"max_tokens": 32000}, "/v1/embeddings", 8192) == (None, None)


def test_infill_maps_to_a_fim_completion_and_back():
    body = {"input_prefix": "def f(", "prompt": "x", "input_suffix": "):", "n_predict": 12,
            "input_extra": [{"filename": "a.py", "text": "A"}], "temperature": 0.1,
            "cache_prompt": True, "t_max_predict_ms": 500}
    out = infill.to_completion(body, "coder", 128)
    assert out == {"model": "coder", "prompt": "def f(", "suffix": "):", "stream": False,
                   "max_tokens": 12, "input_extra": [{"filename": "a.py", "text": "A"}],
                   "temperature": 0.1}
    assert infill.middle(body) == "x"  # llama.cpp puts prompt after the FIM prompt
    q = files_for("qwen")
    done = fim_completion(out, "coder", fim.detect(q), q, 128, infill.middle(body))
    assert done["prompt"].endswith("<|fim_middle|>x")
    assert infill.to_completion({"n_predict": -1}, "coder", 64)["max_tokens"] == 64
    # n_predict 0 (llama.vscode's cache warm-up): evaluate the prompt, return nothing.
    assert infill.to_completion({"n_predict": 0}, "coder", 64)["max_tokens"] == 1
    assert infill.warm_only({"n_predict": 0}) and not infill.warm_only({"n_predict": False})
    assert infill.to_completion({"logit_bias": [[5, -100], "x"]}, "c", 1)["logit_bias"] == {"5": -100}
    with pytest.raises(InvalidRequest):
        infill.to_completion({"n_predict": "many"}, "coder", 64)
    answer = {"choices": [{"text": "y", "finish_reason": "length", "stop_reason": None}],
              "usage": {"prompt_tokens": 9, "completion_tokens": 12}}
    assert infill.from_completion(answer, "coder") == {
        "content": "y", "stop": True, "model": "coder", "tokens_predicted": 12,
        "tokens_evaluated": 9, "truncated": False, "stop_type": "limit", "stopping_word": ""}
    warm = infill.from_completion(answer, "coder", warm=True)
    assert warm["content"] == "" and warm["tokens_predicted"] == 0


def test_infill_stream_events():
    tokens = {"prompt": 4, "completion": 2}
    stream = infill.InfillStream("coder", tokens)
    chunk = lambda text, reason=None: b"data: " + json.dumps(  # noqa: E731
        {"choices": [{"index": 0, "text": text, "finish_reason": reason}]}).encode() + b"\n\n"
    out = stream.feed([b": keep-alive\n\n", chunk("a"), chunk("b", "stop"), b"data: [DONE]\n\n"])
    assert out[0] == b": keep-alive\n\n"
    assert [json.loads(e[6:]) for e in out[1:3]] == [{"content": "a", "stop": False},
                                                      {"content": "b", "stop": False}]
    final = json.loads(out[3][6:])
    assert final["stop"] is True and final["stop_type"] == "eos" and final["content"] == ""
