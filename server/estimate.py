"""Memory estimates from a model folder, without loading weights (pure apart from reading config.json).

KV cache per token, from the model's ``config.json`` (the layout vLLM allocates for full attention)::

    kv_bytes_per_token = 2 (K and V) × num_hidden_layers × num_key_value_heads × head_dim × dtype_bytes

``num_key_value_heads`` defaults to ``num_attention_heads`` (no grouped-query attention) and
``head_dim`` to ``hidden_size / num_attention_heads``. Example: Llama-3-8B (32 layers, 8 KV heads,
head_dim 128, bf16) → 2 × 32 × 8 × 128 × 2 = 131072 bytes = 128 KiB per token.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.config import ModelConfig
    from server.placement import Requirement

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
    """``config.json`` of a local model folder, or ``None`` for a hub id, an unreadable file, or
    one that is not a JSON object."""
    path = Path(model_path) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("text_config", {}), dict):
        return None
    return data


# What a config.json with odd values raises in the formulas above (strings, zeros, nulls).
BAD_CONFIG = (KeyError, ValueError, TypeError, ZeroDivisionError, AttributeError, OverflowError)


# Memory needed on every device beyond weights and KV cache, inside vLLM's budget. GPU: CUDA graphs
# (up to about 0.5 GiB at vLLM's default capture sizes) and the activation peak of vLLM's profiling
# run at its default batch of tokens (about 0.5 GiB for 7-8B models). CPU: the engine's Python
# process, torch and tokenizer.
GPU_OVERHEAD_BYTES = GiB
CPU_OVERHEAD_BYTES = 512 * MiB
# Outside vLLM's budget on every GPU: the engine's CUDA context (and NCCL buffers under tensor
# parallel), created before vLLM measures free memory (placement module doc). torch's CUDA context
# alone measured 621 MiB by NVML on an H200 (driver 580.159, torch 2.11+cu130; tests/gpu/check_nvml.py);
# the rest of the GiB covers NCCL communicators under tensor parallel.
CUDA_CONTEXT_BYTES = GiB


def safetensors_data_bytes(path: Path) -> int:
    """Bytes of tensor data in one ``.safetensors`` file, from its header alone (the largest end
    offset); raises ``ValueError`` on a malformed header."""
    import struct
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length <= 0 or length > 100 * MiB:
            raise ValueError(f"{path}: implausible safetensors header length {length}")
        header = json.loads(fh.read(length))
    return max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
               default=0)


def parameter_count(config: dict[str, Any]) -> int:
    """Parameters of a decoder from its config (fallback when no weight files can be read).

    ``vocab × hidden × (1 if tied else 2) + layers × (2·hidden² + 2·hidden·kv_dim + m·hidden·ffn)``
    with ``kv_dim = KV heads × head_dim`` and ``m = 3`` for gated (SiLU) MLPs, else 2; norms and
    biases are left out (under 0.1 %). Llama-3-8B: 8.03 billion.
    """
    cfg = config.get("text_config") or config
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    kv_dim = int(cfg.get("num_key_value_heads") or heads) * head_dim
    ffn = int(cfg.get("intermediate_size") or 4 * hidden)
    gated = 3 if str(cfg.get("hidden_act", "silu")) in ("silu", "swish", "swiglu") else 2
    embed = int(cfg.get("vocab_size", 32000)) * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_dim + gated * hidden * ffn
    return embed + int(cfg["num_hidden_layers"]) * per_layer


def weight_bytes(model_path: str, config: dict[str, Any] | None) -> int | None:
    """Bytes of weights for a local model folder: the safetensors headers (exact), else the sizes of
    ``*.bin``/``*.pt`` files, else :func:`parameter_count` × dtype bytes; ``None`` for a hub id."""
    folder = Path(model_path)
    if not folder.is_dir():
        return None
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        try:
            return sum(safetensors_data_bytes(s) for s in shards)
        except (OSError, *BAD_CONFIG):
            pass
    other = [p for p in folder.iterdir() if p.suffix in (".bin", ".pt") and p.is_file()]
    if other:
        return sum(p.stat().st_size for p in other)
    if config is not None:
        try:
            return parameter_count(config) * dtype_bytes(config)
        except BAD_CONFIG:
            return None
    return None


def requirement_for(model: "ModelConfig", kind: str, *, kv_sequences: int, available_ram: int,
                    cpu_engines: int) -> "Requirement":
    """The placement :class:`~server.placement.Requirement` of ``model`` on a ``kind`` device.

    Weights from :func:`weight_bytes`; KV cache: the model's ``kv_cache_bytes`` if set, on the CPU
    :func:`cpu_kv_cache_bytes`, on a GPU ``kv_bytes_per_token × max_model_len × kv_sequences``;
    ``memory_bytes`` in the config replaces weights + KV cache. A model whose size cannot be
    estimated books only the overhead on the CPU, and the most available GPU whole.
    """
    from server.placement import Requirement

    config = read_config(model.path)
    weights = weight_bytes(model.path, config)
    heads = None
    kv = model.kv_cache_bytes or 0
    if config is not None:
        heads = (config.get("text_config") or config).get("num_attention_heads")
        if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0:
            heads = None
        if not model.kv_cache_bytes:
            try:
                per_token = kv_bytes_per_token(config)
                context = model.max_model_len or max_model_len(config)
                if per_token <= 0 or context <= 0:
                    raise ValueError("non-positive model dimensions")
                kv = (cpu_kv_cache_bytes(per_token, context, available_ram, cpu_engines)
                      if kind == "cpu" else per_token * context * kv_sequences)
            except BAD_CONFIG:
                pass
    if model.memory_bytes is not None:
        weights, kv = model.memory_bytes, 0
    stages = model.pipeline_parallel_size if model.distributed is not None else 1
    if stages > 1:  # pipeline stages on other hosts: the head holds one stage's share
        weights = None if weights is None else math.ceil(weights / stages)
        kv = math.ceil(kv / stages)
    if weights is None and kind == "cpu":
        weights = 0
    allowed = tuple(f"cuda:{i}" for i in model.gpus) if model.gpus and kind == "cuda" else None
    return Requirement(model=model.name, weight_bytes=weights, kv_cache_bytes=kv,
                       overhead_bytes=GPU_OVERHEAD_BYTES if kind == "cuda" else CPU_OVERHEAD_BYTES,
                       attention_heads=heads, kind=kind, allowed_devices=allowed,
                       tensor_parallel_size=model.tensor_parallel_size,
                       context_bytes=CUDA_CONTEXT_BYTES if kind == "cuda" else 0)
