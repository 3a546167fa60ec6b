"""Where cllm keeps what it makes once and reuses: `$CLLM_HOME` (default ~/.cache/cllm) and its parts."""

from __future__ import annotations

import os
from pathlib import Path


def cllm_home() -> Path:
    """Read at every call, so a test or a user can point it elsewhere at run time."""
    return Path(os.environ.get("CLLM_HOME", "~/.cache/cllm")).expanduser()


def compile_dir() -> Path:
    """Compiled kernels (inductor's cache) and AOTInductor packages (`packages/`)."""
    return cllm_home() / "compile"


def quick_cllm() -> Path:
    """Where `cllm distill quick` puts its CLLM (the recipe's out is {cllm_home}/quick)."""
    return cllm_home() / "quick" / "cllm"
