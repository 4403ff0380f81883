"""Preparing the embedded models from the installed packages, from scratch, as on a fresh machine
(the other e2e tests reuse the shared data dir, so this is the test that always does it)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from server.models import CHAT_MODEL, EMBED_MODEL, MARKER, is_prepared, verify_folder
from tests.gateway import ROOT

pytestmark = pytest.mark.e2e


def prepare(data_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", "prepare", "--data-dir", str(data_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_prepare_from_scratch_is_verified_atomic_and_idempotent(tmp_path):
    models = tmp_path / "models"
    # Leftovers of an interrupted run: a temporary folder and a folder without the marker.
    (models / f".tmp-{CHAT_MODEL}-99999999").mkdir(parents=True)  # its process is gone
    (models / EMBED_MODEL).mkdir()
    (models / EMBED_MODEL / "config.json").write_text("{}")
    res = prepare(tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"preparing embedded model {CHAT_MODEL}" in res.stderr  # progress is shown
    for name, chat in ((CHAT_MODEL, True), (EMBED_MODEL, False)):
        folder = models / name
        assert is_prepared(folder)
        verify_folder(folder, chat=chat)
        assert json.loads((folder / MARKER).read_text())["name"] == name
    config = json.loads((models / CHAT_MODEL / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert not any(p.name.startswith(".tmp-") for p in models.iterdir())
    t0 = time.monotonic()
    again = prepare(tmp_path)
    assert again.returncode == 0 and "preparing" not in again.stderr
    assert time.monotonic() - t0 < 20  # nothing to do: no conversion
