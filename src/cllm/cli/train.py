"""`cllm train`: consistency training."""

from __future__ import annotations

import argparse
import atexit
import os
import sys
from dataclasses import Field
from pathlib import Path

from cllm.cli import common
from cllm.cli.common import stderr
from cllm.errors import CllmError
from cllm.train_config import TrainConfig, flag_fields, flag_name


def add_train(commands) -> None:
    train = commands.add_parser(
        "train",
        help="consistency-train a model on collected trajectories (a CLLM)",
        description="Fine-tunes --model so that from any Jacobi state it predicts the fixed point: "
        "L = L_consistency (gc or lc) + ar-weight * L_AR. Checkpoints go to OUT/checkpoints (--resume "
        "continues from the last one); the final model is saved to OUT, loadable with --model OUT. "
        "Runs as one CPU process or under `accelerate launch` (configs ship with cllm: `cllm distill --list` says "
        "where).",
    )
    train.add_argument("--trajectories", required=True, type=Path, action="append",
                       help="a directory written by cllm collect; repeat it to train on a mix of collections")
    train.add_argument("--out", required=True, type=Path, help="output directory for the trained model")
    for f in flag_fields():
        _add_flag(train, f)
    common.add_model_args(train)


def _add_flag(parser: argparse.ArgumentParser, f: Field) -> None:
    """One TrainConfig field as a flag: its type, default, help and choices come from the field
    (TrainConfig checks the values)."""
    name, help = flag_name(f), f.metadata["help"]
    if f.type == "bool":
        parser.add_argument(name, dest=f.name, action="store_true", help=help)
        return
    parser.add_argument(name, dest=f.name, type={"int": int, "float": common.finite_float, "str": str}[f.type],
                        default=f.default, choices=f.metadata["choices"], help=help + " (default: %(default)s)")


def cmd_train(args: argparse.Namespace) -> None:
    from cllm.training import is_main_process, train
    from cllm.trajectories import shard_files

    for directory in args.trajectories:
        if "," in str(directory):
            raise CllmError(f"a trajectories directory name may not contain a comma: {directory}")
    settings = {f.name: getattr(args, f.name) for f in flag_fields()}
    config = TrainConfig(model=args.model, trajectories=",".join(map(str, args.trajectories)), out=str(args.out),
                         dtype=args.dtype, device=args.device, **settings)
    for directory in args.trajectories:
        shard_files(directory)  # a damaged or foreign collection is refused before the model loads
    out = train(config)
    if is_main_process():
        if config.adapter_only:
            stderr.print(f"saved the drafter adapter to {out}; try: cllm generate --model {config.model} "
                         f"--drafter {out} --decoder jacobi PROMPT")
        else:
            stderr.print(f"saved the trained model to {out}; try: cllm generate --model {out} --decoder jacobi PROMPT")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _end_launched_process()


def _end_launched_process() -> None:
    """End a launched rank (torchrun, accelerate launch) here, its work saved and its process group
    shut down, without the interpreter's teardown: there a C++ destructor of the distributed
    stack can abort ("terminate called without an active exception"; 2 of the 9 launches of one
    fresh-clone suite run, 2 CPU processes), which fails a run whose model is saved. Python's exit
    handlers (logging, trackers) still run."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
