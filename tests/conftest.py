import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

# Test helpers (tiny_models) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread each (subprocesses inherit it), or torch's spinning
    # threads oversubscribe the cores and every test runs several times slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list) -> None:
    """Files with slow or heavy tests first: `-n 2 --dist loadfile` hands out files in this order,
    so the longest ones start at once instead of leaving one worker alone at the end."""
    heavy = Counter(item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("heavy"))
    tests = Counter(item.path for item in items)
    # RUN_FIRST marks a file that is one long test (a wheel built and installed): it starts at once,
    # so the other worker runs the rest beside it. Then the most heavy tests first, then the most
    # tests (xdist's own order, which `make test` turns off for this one); stable within a file.
    items.sort(key=lambda item: (not getattr(item.module, "RUN_FIRST", False), -heavy[item.path], -tests[item.path]))


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny qwen2 model and a small trajectory collection of it (blocks of 4), for training tests."""
    from tiny_models import save_tiny_model

    from cllm.cli import main

    root = tmp_path_factory.mktemp("train")
    model = save_tiny_model(root / "model", arch="qwen2", seed=3)
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["abc", "hello world", "xyz", "jacobi"]) + "\n")
    out = root / "trajectories"
    assert main(["collect", "--model", str(model), "--dataset", "jsonl", "--path", str(prompts), "--out", str(out),
                 "--block-size", "4", "--max-new-tokens", "16", "--augment"]) == 0
    return model, out
