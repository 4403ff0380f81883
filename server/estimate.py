"""Memory estimates from a model folder, without loading weights (pure apart from reading config.json).

KV cache per token, from the model's ``config.json`` (the layout vLLM allocates for full attention)::

    kv_bytes_per_token = 2 (K and V) × num_hidden_layers × num_key_value_heads × head_dim × dtype_bytes

``num_key_value_heads`` defaults to ``num_attention_heads`` (no grouped-query attention) and
``head_dim`` to ``hidden_size / num_attention_heads``. Example: Llama-3-8B (32 layers, 8 KV heads,
head_dim 128, bf16) → 2 × 32 × 8 × 128 × 2 = 131072 bytes = 128 KiB per token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float8": 1,
               "fp8": 1, "int8": 1}
MiB = 2**20
GiB = 2**30


def dtype_bytes(config: dict[str, Any], default: int = 2) -> int:
    """Bytes per element of the model's dtype (``dtype`` or legacy ``torch_dtype`` in config.json)."""
    name = str(config.get("dtype") or config.get("torch_dtype") or "").replace("torch.", "")
    return DTYPE_BYTES.get(name, default)


def kv_bytes_per_token(config: dict[str, Any], kv_dtype_bytes: int | None = None) -> int:
    """KV-cache bytes one token takes, from an HF ``config.json`` mapping (formula in the module doc).

    Multimodal configs keep the language model under ``text_config``. Raises ``KeyError`` when the
    config lacks ``num_hidden_layers`` or ``num_attention_heads``.
    """
    cfg = config.get("text_config") or config
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    nbytes = kv_dtype_bytes or dtype_bytes(cfg, dtype_bytes(config))
    return 2 * layers * kv_heads * head_dim * nbytes


def max_model_len(config: dict[str, Any]) -> int:
    """The context length the model was built for (``max_position_embeddings``; 2048 if absent)."""
    cfg = config.get("text_config") or config
    return int(cfg.get("max_position_embeddings") or 2048)


def cpu_kv_cache_bytes(per_token: int, context_len: int, available_ram: int, cpu_engines: int,
                       *, sequences: int = 4, ram_share: float = 0.5, floor: int = 64 * MiB) -> int:
    """KV cache to give a vLLM CPU engine (``--kv-cache-memory-bytes``), in bytes.

    Room for ``sequences`` full-length sequences (``per_token × context_len × sequences``), capped at
    ``ram_share`` of the available RAM split evenly over the ``cpu_engines`` engines, and never below
    ``floor`` (vLLM needs at least one full sequence's blocks; 64 MiB covers the embedded models).
    Rounded down to whole MiB.
    """
    want = per_token * context_len * sequences
    cap = int(available_ram * ram_share / max(1, cpu_engines))
    return max(floor, min(want, cap)) // MiB * MiB


def read_config(model_path: str) -> dict[str, Any] | None:
    """``config.json`` of a local model folder, or ``None`` for a hub id or an unreadable file."""
    path = Path(model_path) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
