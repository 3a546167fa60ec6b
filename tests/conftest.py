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
