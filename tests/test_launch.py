"""Multi-process runs on 2 CPU processes (gloo), under torchrun and accelerate launch: training
saves one model that decodes exactly, and a sharded collection equals one process's. A file of its
own so that these subprocess-heavy tests run beside the rest under pytest-xdist."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
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


def free_port() -> str:
    with socket.socket() as probe:  # a fixed port collides with a run that has not let go of it yet
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def launch(command: list[str], env: dict[str, str], timeout: float = 150) -> subprocess.CompletedProcess:
    """Run a multi-process launch; a run that hangs gets SIGABRT on the launcher and every worker, so
    that faulthandler prints each rank's Python stack into the failure instead of a bare timeout.
    torch's elastic agent starts each worker in a session of its own: signalling the launcher's
    process group alone would leave them running and holding the pipes."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env | {"PYTHONFAULTHANDLER": "1"}, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        family = psutil.Process(process.pid).children(recursive=True) + [psutil.Process(process.pid)]
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(signal.SIGABRT)
        psutil.wait_procs(family, timeout=20)
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"the launch hung for {timeout} s; stacks at the abort:\n{stderr[-12000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


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


SHARDED_TEACHER = """
import json, sys
import torch, torch.distributed as dist
from torch.distributed.tensor import DTensor
sys.path.insert(0, sys.argv[1])
from tiny_models import tiny_model
from cllm.training import shard_for_inference

dist.init_process_group("gloo")
replica = tiny_model("llama").eval()
sharded = shard_for_inference(tiny_model("llama").eval().requires_grad_(False))
ids = torch.randint(2, 40, (2, 9), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    same = [torch.equal(replica(ids).logits, sharded(ids).logits) for _ in range(2)]
held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in sharded.parameters())
report = {"same": same, "held": held, "total": sum(p.numel() for p in replica.parameters()),
          "all_sharded": all(isinstance(p, DTensor) for p in sharded.parameters())}
open(f"{sys.argv[2]}/rank{dist.get_rank()}.json", "w").write(json.dumps(report))
dist.barrier()
dist.destroy_process_group()
"""


def test_a_teacher_sharded_over_two_processes_gives_the_replicas_logits(tmp_path):
    """Under FSDP the trainer shards its frozen teacher (cllm.training.shard_for_inference): each of
    2 CPU processes holds half the weights, gathered per forward, and gets the same float64 logits
    as a full replica, forward after forward (accelerate runs no FSDP on CPUs, torch's FSDP2 does)."""
    script = tmp_path / "sharded_teacher.py"
    script.write_text(SHARDED_TEACHER)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    result = launch([torchrun, "--nproc_per_node", "2", "--master_port", free_port(), str(script),
                     str(Path(__file__).parent), str(tmp_path)], os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["same"] == [True, True] and report["all_sharded"]
        assert report["held"] <= 0.55 * report["total"]


def test_deepspeed_zero3_shards_the_teacher_and_trains_as_zero2_does(collection, tmp_path, capsys):
    """The shipped DeepSpeed configs on 2 CPU processes (DeepSpeed's CPU accelerator, gloo), a LoRA
    student beside a teacher: ZeRO-2 keeps the teacher a replica per rank, ZeRO-3 partitions it like
    the student, gathers the adapter to save it and merges it on rank 0. The first step's loss
    (teacher and student as loaded) is the same under both; each saved model decodes exactly."""
    model, trajectories = collection
    configs = Path(__file__).resolve().parents[1] / "src" / "cllm" / "configs"
    runs = {}
    for stage, teacher in (("zero2", "replica"), ("zero3", "sharded")):
        out = tmp_path / stage
        command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                   str(configs / f"accelerate-deepspeed-{stage}.yaml"), "--num_processes", "2",
                   "--mixed_precision", "no", "--main_process_port", free_port(), "-m", "cllm.cli", "train",
                   "--model", str(model), "--trajectories", str(trajectories), "--out", str(out), "--max-steps", "3",
                   "--batch-size", "2", "--lr", "1e-3", "--logging-steps", "1", "--lora", "--lora-rank", "4",
                   "--teacher", "--distill-weight", "0.5"]
        result = launch(command, os.environ | {"OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[:3000] + " ... " + result.stderr[-1000:]
        summary = json.loads((out / "train_summary.json").read_text())
        assert (summary["processes"], summary["engine"], summary["teacher"]) == (2, "deepspeed", teacher)
        assert not (out / "adapter_config.json").exists(), "the adapter is merged into the saved model"
        assert generate_ids(out, "jacobi", capsys) == generate_ids(out, "ar", capsys)
        history = json.loads((out / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
        runs[stage] = [entry["loss"] for entry in history if "loss" in entry]
    assert len(runs["zero3"]) == 3
    assert runs["zero3"][0] == pytest.approx(runs["zero2"][0], rel=1e-5)
