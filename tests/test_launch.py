"""Multi-process runs on 2 CPU processes (gloo), under torchrun and accelerate launch: training
saves one model that decodes exactly, and a sharded collection equals one process's. A file of its
own so that these subprocess-heavy tests run beside the rest under pytest-xdist (the engines'
sharded teachers are in test_launch_engines.py, for the same reason)."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch
from launching import free_port, launch
from tiny_models import generate_ids, save_tiny_model

from cllm.trajectories import read_entries

pytestmark = pytest.mark.heavy
CLLM = [sys.executable, "-m", "cllm.cli"]


ACCELERATE = ["accelerate", "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
LAUNCHERS = {  # launcher -> (command, the engine the Trainer runs); the port follows the command
    "torchrun": (["torchrun", "--nproc_per_node", "2", "--master_port"], "ddp"),
    # --multi_gpu starts torch.distributed processes, which join over gloo without a GPU (--cpu starts one)
    "accelerate": ([*ACCELERATE, "--multi_gpu", "--main_process_port"], "ddp"),
    # accelerate 1.16 applies FSDP on GPU-like devices only (accelerate/state.py): on CPUs the same
    # launch runs DDP, and the model is saved the same way
    "accelerate-fsdp": ([*ACCELERATE, "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy",
                         "TRANSFORMER_BASED_WRAP", "--fsdp_state_dict_type", "FULL_STATE_DICT",
                         "--main_process_port"], "ddp"),
}




@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_process_cpu_training(collection, tmp_path, capsys, launcher):
    """2 CPU processes (gloo) under torchrun and under accelerate launch: one saved model, which
    decodes exactly (Jacobi == AR) like any other; scheduler and weight decay reach the Trainer."""
    model, trajectories = collection
    out = tmp_path / "cllm"
    (program, *options), engine = LAUNCHERS[launcher]
    command = [str(Path(sys.executable).parent / program), *options, free_port(), "-m", "cllm.cli", "train",
               "--model", str(model), "--trajectories", str(trajectories), "--out", str(out),
               "--max-steps", "3", "--batch-size", "2", "--lr", "1e-3", "--logging-steps", "1",
               "--lr-scheduler", "cosine", "--weight-decay", "0.1", "--attn-implementation", "eager"]
    result = launch(command, os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[:3000] + " ... " + result.stderr[-1000:]
    state = json.loads((out / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["train_batch_size"] == 2
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["processes"], summary["engine"]) == (2, engine)
    arguments = torch.load(out / "checkpoints" / "checkpoint-3" / "training_args.bin", weights_only=False)
    assert (arguments.lr_scheduler_type.value, arguments.weight_decay, arguments.report_to) == ("cosine", 0.1, [])
    assert generate_ids(out, "jacobi", capsys) == generate_ids(out, "ar", capsys)



def test_a_collection_over_two_launched_processes_equals_the_single_process_one(tmp_path):
    """accelerate launch with 2 CPU processes: each takes its RANK's share of the prompts into the
    same directory, which then reads exactly like one process's collection."""
    model_dir = save_tiny_model(tmp_path / "model", arch="llama", seed=5, eos_token_id=21)
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "echo", "fox", "golf", "hotel"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.sample(words, 3))}) + "\n" for _ in range(9)))
    common = ["collect", "--model", str(model_dir), "--dataset", "jsonl", "--path", str(prompts),
              "--block-size", "4", "--max-new-tokens", "24", "--batch-size", "2"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    program, *options = ACCELERATE
    launcher = [str(Path(sys.executable).parent / program), *options, "--multi_gpu", "--main_process_port", free_port(),
              "-m", "cllm.cli"]
    for command in ([*launcher, *common, "--out", str(tmp_path / "two")],
                    [*CLLM, *common, "--out", str(tmp_path / "one")]):
        result = launch(command, env)
        assert result.returncode == 0, result.stderr[-3000:]
    two, one = (read_entries(tmp_path / name).to_pylist() for name in ("two", "one"))
    assert len(one) > 9 and sorted(two, key=json.dumps) == sorted(one, key=json.dumps)

