"""Synthetic FIM models for the e2e tests: no small FIM-trained model ships in any package, so each
family gets a tiny Llama config (random weights: vLLM's ``--load-format dummy``) and the embedded
SmolLM2 tokenizer with that family's FIM and stop tokens added as special tokens.

What the tests check with them is the gateway's part, which needs no trained weights: the prompt
the engine tokenizes (its token ids), the stop token ids it honours, streaming and cancellation.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.unit.test_fim import EOS, TOKENS

# One stop token per family that is not the end-of-sequence token: forcing it (logit_bias) must
# stop generation, which only happens when the gateway sent it as a stop token id.
FAMILY_STOP = {"starcoder": "<file_sep>", "qwen": "<|file_sep|>", "codellama": "▁<EOT>",
               "deepseek": "<|EOT|>", "codestral": "[PREFIX]", "codegemma": "<|file_separator|>"}
ROLE_TOKENS = {"starcoder": ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
               "qwen": ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
               "codellama": ("▁<PRE>", "▁<SUF>", "▁<MID>"),
               "deepseek": ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
               "codestral": ("[SUFFIX]", "[PREFIX]"),
               "codegemma": ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")}


def build(family: str, base: Path, dest: Path) -> Path:
    """Write the synthetic ``family`` model into ``dest`` from the SmolLM2 folder ``base``."""
    from tokenizers import AddedToken, Tokenizer

    dest.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TOKENS[family]])
    tok.save(str(dest / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS[family],
        "bos_token": None, "model_max_length": 2048, "clean_up_tokenization_spaces": False}))
    (dest / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
        "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 64, "max_position_embeddings": 2048,
        "vocab_size": (vocab + 63) // 64 * 64, "rms_norm_eps": 1e-5, "dtype": "bfloat16",
        "tie_word_embeddings": True, "eos_token_id": tok.token_to_id(EOS[family]),
        "bos_token_id": None, "rope_theta": 10000.0}))
    return dest
