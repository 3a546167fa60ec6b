import os
import sys
from pathlib import Path

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
    heavy_files = {item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("heavy")}
    items.sort(key=lambda item: item.path not in heavy_files)  # stable: the order within a file stays
