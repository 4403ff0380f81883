import json
import struct

import pytest

from server.config import ModelConfig
from server.engines import engine_launch
from server.estimate import MiB, cpu_kv_cache_bytes, kv_bytes_per_token, max_model_len
from server.models import safetensors_tensor_count, verify_folder
from server.estimate import requirement_for

LLAMA3_8B = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "intermediate_size": 14336, "vocab_size": 128256, "hidden_act": "silu",
             "hidden_size": 4096, "torch_dtype": "bfloat16", "max_position_embeddings": 8192}
SMOLLM2_135M = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "head_dim": 64, "hidden_size": 576, "dtype": "bfloat16",
                "max_position_embeddings": 8192}


def test_kv_bytes_per_token_known_models():
    assert kv_bytes_per_token(LLAMA3_8B) == 128 * 1024  # 2 × 32 × 8 × 128 × 2
    assert kv_bytes_per_token(SMOLLM2_135M) == 23040  # 2 × 30 × 3 × 64 × 2
    assert kv_bytes_per_token({"text_config": LLAMA3_8B}) == 128 * 1024
    assert kv_bytes_per_token({**LLAMA3_8B, "torch_dtype": "float32"}) == 256 * 1024
    assert max_model_len(LLAMA3_8B) == 8192


def test_cpu_kv_cache_is_bounded_by_ram_and_floor():
    assert cpu_kv_cache_bytes(23040, 8192, 20 * 2**30, 2) == 23040 * 8192 * 4 // MiB * MiB
    assert cpu_kv_cache_bytes(23040, 8192, 200 * MiB, 2) == 64 * MiB  # floor
    assert cpu_kv_cache_bytes(128 * 1024, 8192, 4 * 2**30, 2) == 1024 * MiB  # half of RAM, split


def test_requirement_reads_model_folders(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M))
    _safetensors(tmp_path / "model.safetensors", ["w"], nbytes=1000)
    cpu = requirement_for(ModelConfig("a", str(tmp_path)), "cpu", kv_sequences=4,
                          available_ram=16 * 2**30, cpu_engines=2)
    assert cpu.weight_bytes == 1000 and cpu.kv_cache_bytes == 23040 * 8192 * 4 // MiB * MiB
    gpu = requirement_for(ModelConfig("a", str(tmp_path), gpus=(1,)), "cuda", kv_sequences=2,
                          available_ram=0, cpu_engines=0)
    assert gpu.kv_cache_bytes == 23040 * 8192 * 2 and gpu.allowed_devices == ("cuda:1",)
    assert gpu.attention_heads == 9
    hub = requirement_for(ModelConfig("hub", "org/not-local"), "cuda", kv_sequences=4,
                          available_ram=0, cpu_engines=0)
    assert hub.weight_bytes is None
    fixed = requirement_for(ModelConfig("hub", "org/x", memory_bytes=5 * 2**30), "cuda",
                            kv_sequences=4, available_ram=0, cpu_engines=0)
    assert fixed.per_device_bytes(1) == 5 * 2**30 + fixed.overhead_bytes


def test_engine_launch_cpu_and_gpu():
    m = ModelConfig("m", "/models/m", engine_args=("--max-num-seqs", "4"))
    tp = engine_launch(m, port=1, device="cuda", python="py", module="v", gpu_memory_utilization=0.25,
                       tensor_parallel_size=2, cuda_devices=(2, 3))
    assert tp.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert tp.argv[tp.argv.index("--tensor-parallel-size") + 1] == "2"
    assert tp.argv[tp.argv.index("--gpu-memory-utilization") + 1] == "0.2500"
    cpu = engine_launch(m, port=1234, device="cpu", python="py", module="vllm.x", kv_cache_bytes=2**30)
    assert cpu.argv[:3] == ("py", "-m", "vllm.x")
    a = list(cpu.argv)
    assert a[a.index("--served-model-name") + 1] == "m" and a[a.index("--host") + 1] == "127.0.0.1"
    assert "--enforce-eager" in a and a[a.index("--kv-cache-memory-bytes") + 1] == str(2**30)
    assert a[-2:] == ["--max-num-seqs", "4"]  # the user's own arguments come last and win
    gpu = engine_launch(m, port=1, device="cuda", python="py", module="vllm.x")
    assert "--enforce-eager" not in gpu.argv and "--kv-cache-memory-bytes" not in gpu.argv
    emb = engine_launch(ModelConfig("e", "/e", task="embed", kv_cache_bytes=5), port=1, device="cpu",
                        python="py", module="v", kv_cache_bytes=7)
    assert ("--runner", "pooling") == tuple(emb.argv[emb.argv.index("--runner"):][:2])
    assert emb.argv[emb.argv.index("--kv-cache-memory-bytes") + 1] == "5"  # the config wins
    assert cpu.base_url == "http://127.0.0.1:1234"


def _safetensors(path, names, nbytes=4):
    header = json.dumps({n: {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [0, nbytes]}
                         for n in names})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode())  # no data: headers suffice


def test_verify_folder(tmp_path):
    with pytest.raises(ValueError, match="config.json is missing"):
        verify_folder(tmp_path, chat=True)
    (tmp_path / "config.json").write_text("{}")
    _safetensors(tmp_path / "model.safetensors", ["w", "b"])
    assert safetensors_tensor_count(tmp_path / "model.safetensors") == 2
    with pytest.raises(ValueError, match="no tokenizer"):
        verify_folder(tmp_path, chat=True)
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no chat template"):
        verify_folder(tmp_path, chat=True)
    verify_folder(tmp_path, chat=False)
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    verify_folder(tmp_path, chat=True)


def llama3_8b_tensors():
    """Llama-3-8B's tensor shapes (from its published safetensors index)."""
    h, ffn, kv, vocab = 4096, 14336, 1024, 128256
    shapes = {"model.embed_tokens.weight": (vocab, h), "lm_head.weight": (vocab, h),
              "model.norm.weight": (h,)}
    for i in range(32):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                       p + "mlp.down_proj.weight": (h, ffn), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    return shapes


def test_llama3_8b_weights_from_safetensors_headers(tmp_path):
    from server.estimate import parameter_count, weight_bytes
    header, offset = {}, 0
    for name, shape in llama3_8b_tensors().items():
        n = 2
        for dim in shape:
            n *= dim
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    # Two shards as published; headers only, no tensor data on disk.
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    # A broken second shard falls back to the parameter formula, which lands within 0.1 %.
    estimate = weight_bytes(str(tmp_path), LLAMA3_8B)
    assert abs(estimate - 16.06e9) / 16.06e9 < 0.001
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    exact = weight_bytes(str(tmp_path), LLAMA3_8B)
    assert exact == 16_060_522_496  # 8,030,261,248 parameters × 2 bytes
    assert abs(parameter_count(LLAMA3_8B) * 2 - exact) / exact < 0.001
