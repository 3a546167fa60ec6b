"""The frozen teacher sharded like the student, on 2 CPU processes: FSDP2's sharding on its own
(torchrun, gloo) and a DeepSpeed ZeRO-3 training through the shipped accelerate config.
Apart from test_launch.py so that pytest-xdist runs the two files' launches side by side."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from launching import free_port, launch
from tiny_models import generate_ids

pytestmark = pytest.mark.heavy


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


def test_deepspeed_zero3_shards_the_teacher_gathers_and_merges_the_adapter(collection, tmp_path, capsys):
    """The shipped ZeRO-3 config on 2 CPU processes (DeepSpeed's CPU accelerator, gloo), a LoRA
    student beside a teacher: both partitioned over the ranks, the adapter gathered to save it and
    merged on rank 0. The LoRA starts at zero, so the student is the teacher at the first step: the
    distillation KL is 0 there only if the sharded teacher's logits are right; it grows after."""
    model, trajectories = collection
    config = Path(__file__).resolve().parents[1] / "src" / "cllm" / "configs" / "accelerate-deepspeed-zero3.yaml"
    out = tmp_path / "zero3"
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config),
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", free_port(),
               "-m", "cllm.cli", "train", "--model", str(model), "--trajectories", str(trajectories),
               "--out", str(out), "--max-steps", "3", "--batch-size", "2", "--lr", "1e-2", "--logging-steps", "1",
               "--lora", "--lora-rank", "4", "--teacher", "--distill-weight", "0.5"]
    result = launch(command, os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[:3000] + " ... " + result.stderr[-1000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["processes"], summary["engine"], summary["teacher"]) == (2, "deepspeed", "sharded")
    assert not (out / "adapter_config.json").exists(), "the adapter is merged into the saved model"
    assert generate_ids(out, "jacobi", capsys) == generate_ids(out, "ar", capsys)
    history = json.loads((out / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    kl = [entry["distill_loss"] for entry in history if "distill_loss" in entry]
    assert len(kl) == 3 and kl[0] < 1e-4 and max(kl[1:]) > 1e-3, kl
