"""Trajectory collection on a tiny model: entry correctness, engines, resume after SIGKILL, bad dirs."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from tiny_models import save_tiny_model

from cllm.cli import main
from cllm.data import PromptRecord
from cllm.decoding import accepted_per_iteration, ar
from cllm.errors import CllmError
from cllm.metrics import is_degenerate, longest_repetition
from cllm.models import load_model
from cllm.trajectories import (
    CollectConfig,
    CollectionDir,
    augment_states,
    collect,
    load_trajectories,
    read_entries,
)

CLLM = [sys.executable, "-m", "cllm.cli"]
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # Token 21 is frequent in this model's outputs: as EOS it stops several of them inside a block.
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", arch="llama", seed=5, eos_token_id=21)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(str(model_dir))


def prompts_file(path: Path, count: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [json.dumps({"prompt": " ".join(rng.sample(WORDS, rng.randint(1, 4))), "answer": f"label {i}"})
             for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def records(count: int) -> list[PromptRecord]:
    rng = random.Random(1)
    return [PromptRecord(id=f"p{i}", text=" ".join(rng.sample(WORDS, rng.randint(1, 4))), label=f"answer {i}")
            for i in range(count)]


def config(model_dir, **overrides) -> CollectConfig:
    values = dict(model=str(model_dir), dataset="test", block_size=5, max_new_tokens=23, batch_size=3)
    return CollectConfig(**(values | overrides))


def test_entries_are_exact_jacobi_trajectories(loaded, model_dir, tmp_path):
    prompts = records(7)
    summary = collect(loaded, prompts, config(model_dir, augment=True), tmp_path / "out")
    table = read_entries(tmp_path / "out")
    assert summary.entries == len(table) > 7
    eos = loaded.eos_token_ids
    by_prompt: dict[str, list[dict]] = {}
    for entry in table.to_pylist():
        by_prompt.setdefault(entry["prompt_id"], []).append(entry)
    assert set(by_prompt) == {r.id for r in prompts}
    stopped_at_eos = 0
    for record in prompts:
        entries = by_prompt[record.id]
        prompt_ids = loaded.encode_prompt(record.text)
        teacher = ar(loaded.model, torch.tensor([prompt_ids]), max_new_tokens=23, eos_token_id=eos).token_ids[0]
        stopped_at_eos += teacher[-1] in eos
        assert [e["block_index"] for e in entries] == list(range(len(entries)))
        for entry in entries:
            assert entry["prompt_ids"] == prompt_ids
            assert entry["teacher_output_ids"] == teacher
            assert entry["label_ids"] == loaded.tokenizer(record.label, add_special_tokens=False).input_ids
            # The fixed point is the greedy continuation of the prefix.
            prefix = entry["prefix_ids"]
            assert prefix == prompt_ids + teacher[: len(prefix) - len(prompt_ids)]
            continuation = ar(loaded.model, torch.tensor([prefix]), max_new_tokens=len(entry["fixed_point"]),
                              eos_token_id=eos).token_ids[0]
            assert entry["fixed_point"] == continuation
            states = torch.tensor(entry["states"])
            assert entry["iterations"] == len(states) - 1 == len(accepted_per_iteration(states))
            assert states[-1].tolist() == entry["fixed_point"]
            # Consecutive states are one cache-free Jacobi step apart.
            with torch.no_grad():
                for before, after in zip(states[:-1], states[1:]):
                    tokens = torch.tensor([prefix + before.tolist()])
                    step = loaded.model(input_ids=tokens).logits[0, len(prefix) - 1 : -1].argmax(-1)
                    assert torch.equal(step[: len(after)], after)
            for augmented in entry["augmented_states"]:
                assert len(augmented) == len(entry["fixed_point"])
    assert stopped_at_eos > 0, "no output hit EOS: the test would not cover EOS inside a block"


def test_kv_and_nokv_engines_write_identical_entries(loaded, model_dir, tmp_path):
    prompts = records(4)
    collect(loaded, prompts, config(model_dir, batch_size=1, engine="kv"), tmp_path / "kv")
    collect(loaded, prompts, config(model_dir, batch_size=1, engine="nokv"), tmp_path / "nokv")
    assert read_entries(tmp_path / "kv").to_pylist() == read_entries(tmp_path / "nokv").to_pylist()


def test_batch_composition_does_not_change_entries(loaded, model_dir, tmp_path):
    prompts = records(5)
    collect(loaded, prompts, config(model_dir, batch_size=1), tmp_path / "one")
    collect(loaded, prompts, config(model_dir, batch_size=5), tmp_path / "five")
    assert read_entries(tmp_path / "one").to_pylist() == read_entries(tmp_path / "five").to_pylist()


def test_output_is_a_datasets_dataset_and_sharding_partitions_prompts(loaded, model_dir, tmp_path):
    prompts = records(8)
    collect(loaded, prompts, config(model_dir), tmp_path / "whole")
    for shard in range(3):
        collect(loaded, prompts, config(model_dir), tmp_path / "split", shard_index=shard, num_shards=3)
    whole, split = read_entries(tmp_path / "whole").to_pylist(), read_entries(tmp_path / "split").to_pylist()
    assert whole == split
    dataset = load_trajectories(tmp_path / "split")
    assert len(dataset) == len(whole) and "states" in dataset.column_names
    import datasets

    assert len(datasets.load_dataset(str(tmp_path / "split"), split="train")) == len(whole)


def run_collect(model_dir: Path, prompts: Path, out: Path) -> subprocess.Popen:
    args = ["collect", "--model", str(model_dir), "--dataset", "jsonl", "--path", str(prompts), "--out", str(out),
            "--block-size", "4", "--max-new-tokens", "40", "--batch-size", "2", "--label-field", "answer"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(CLLM + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


@pytest.mark.heavy
def test_sigkill_then_rerun_gives_exactly_the_uninterrupted_entries(model_dir, tmp_path):
    prompts = prompts_file(tmp_path / "prompts.jsonl", 400)
    reference = run_collect(model_dir, prompts, tmp_path / "reference")
    assert reference.wait(timeout=600) == 0, reference.stderr.read().decode()

    killed_dir = tmp_path / "killed"
    victim = run_collect(model_dir, prompts, killed_dir)
    deadline = time.time() + 300
    while len(list((killed_dir / "data").glob("train-*.parquet"))) < 3 and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.3))  # a random moment, mid-batch or mid-write
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    shards_at_kill = len(list((killed_dir / "data").glob("train-*.parquet")))
    assert 3 <= shards_at_kill < 200, "the kill must land mid-collection"

    resumed = run_collect(model_dir, prompts, killed_dir)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()
    summary = json.loads((killed_dir / "summary-p000of001.json").read_text())
    assert summary["prompts_resumed"] >= 2 * 3

    expected, got = read_entries(tmp_path / "reference"), read_entries(killed_dir)
    assert len(got) == len(expected)
    keys = [(e["prompt_id"], e["block_index"]) for e in got.select(["prompt_id", "block_index"]).to_pylist()]
    assert len(set(keys)) == len(keys), "duplicate entries"
    assert got.to_pylist() == expected.to_pylist()


def test_bad_output_directories_are_clear_errors(loaded, model_dir, tmp_path):
    prompts = records(2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CllmError, match="not a cllm trajectory collection"):
        collect(loaded, prompts, config(model_dir), foreign)

    done = tmp_path / "done"
    collect(loaded, prompts, config(model_dir), done)
    with pytest.raises(CllmError, match="different settings.*block_size"):
        collect(loaded, prompts, config(model_dir, block_size=7), done)

    (done / "cllm_manifest.json").write_text("{ broken")
    with pytest.raises(CllmError, match="corrupt"):
        collect(loaded, prompts, config(model_dir), done)

    with pytest.raises(CllmError, match="lookup rewrites iterates"):
        config(model_dir, init="lookup")

    shard_broken = tmp_path / "shard"
    collect(loaded, prompts, config(model_dir), shard_broken)
    next((shard_broken / "data").glob("*.parquet")).write_bytes(b"PAR1 garbage")
    with pytest.raises(CllmError, match="unreadable"):
        collect(loaded, prompts, config(model_dir), shard_broken)


def test_collect_and_inspect_cli(model_dir, tmp_path, capsys):
    prompts = prompts_file(tmp_path / "p.jsonl", 5)
    out = tmp_path / "out"
    args = ["collect", "--model", str(model_dir), "--dataset", "jsonl", "--path", str(prompts), "--out", str(out),
            "--block-size", "4", "--max-new-tokens", "12"]
    assert main(args) == 0
    assert main(args) == 0  # resumes: nothing left to do
    summary = json.loads((out / "summary-p000of001.json").read_text())
    assert summary["prompts_resumed"] == 5 and summary["prompts_collected"] == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompts"] == 5 and report["entries"] == len(read_entries(out))
    assert sum(report["tokens_gained_per_iteration"].values()) == sum(
        e["iterations"] for e in read_entries(out).to_pylist()
    )
    assert main(["data", "inspect", str(out)]) == 0
    assert "sample entry" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path)]) == 2
    assert main(["collect", "--model", str(model_dir), "--dataset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert main(args[:-4] + ["--block-size", "0"]) == 2


def test_degenerate_detection_and_augmentation():
    assert longest_repetition([1, 2, 3, 4, 5]) == 0
    assert longest_repetition([7] * 10) == 10
    assert longest_repetition([1, 2] + [3, 4, 5] * 6 + [9]) == 18
    assert is_degenerate([1, 2] * 20, span=32) and not is_degenerate(list(range(40)), span=32)
    rng = random.Random(0)
    states = [[9, 9, 9, 4], [1, 9, 3, 4], [1, 2, 3, 4]]
    for _ in range(20):
        augmented = augment_states(states, states[-1], rng)
        assert len(augmented) == 2
        for original, new in zip(states, augmented):
            changed = [i for i, (a, b) in enumerate(zip(original, new)) if a != b]
            assert changed and all(new[i] == states[-1][i] and original[i] != states[-1][i] for i in changed)


def test_parquet_shards_record_their_prompts(loaded, model_dir, tmp_path):
    collect(loaded, records(4), config(model_dir, batch_size=2), tmp_path / "out")
    files = sorted((tmp_path / "out" / "data").glob("*.parquet"))
    covered = [json.loads(pq.read_schema(f).metadata[b"cllm_prompt_ids"]) for f in files]
    assert covered == [["p0", "p1"], ["p2", "p3"]]


def test_a_larger_limit_extends_a_collection_and_a_smaller_one_is_refused(loaded, model_dir, tmp_path):
    prompts = records(6)
    grown, whole = tmp_path / "grown", tmp_path / "whole"
    collect(loaded, prompts[:3], config(model_dir, limit=3), grown)
    summary = collect(loaded, prompts, config(model_dir, limit=6), grown)
    assert (summary.prompts_resumed, summary.prompts_collected) == (3, 3)
    assert json.loads((grown / "cllm_manifest.json").read_text())["config"]["limit"] == 6
    collect(loaded, prompts, config(model_dir, limit=6), whole)
    assert read_entries(grown).to_pylist() == read_entries(whole).to_pylist()
    with pytest.raises(CllmError, match="more prompts than this --limit"):
        collect(loaded, prompts[:3], config(model_dir, limit=3), grown)
    assert json.loads((grown / "cllm_manifest.json").read_text())["config"]["limit"] == 6


def test_two_ranks_opening_one_collection_at_once_both_succeed(tmp_path):
    """The ranks of a launch create, check and write the same directory at the same moment: rank 1
    once saw rank 0's data/ before its manifest ("not a cllm trajectory collection", exit 2)."""
    roots = [str(tmp_path / str(i)) for i in range(100)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        failures = [f for f in pool.map(_open_and_write_as_rank, [(r, rank) for r in roots for rank in (0, 1)],
                                        chunksize=1) if f]
    assert failures == []
    assert all(len(list((Path(r) / "data").glob("train-*.parquet"))) == 2 for r in roots)


def _open_and_write_as_rank(root_and_rank: tuple[str, int]) -> str | None:
    root, rank = root_and_rank
    try:
        directory = CollectionDir(Path(root), config("model"), rank, 2)
        directory.set_limit(config("model"), 1)
        directory.write(0, [f"p{rank}"], [])
    except (CllmError, OSError) as exc:
        return repr(exc)
    return None


def test_a_drafters_collection_holds_its_own_states_and_the_targets_fixed_points(loaded, model_dir, tmp_path):
    from tiny_models import save_tiny_adapter

    from cllm.drafters import write_drafter_kind

    adapter = save_tiny_adapter(model_dir, tmp_path / "adapter", seed=4)
    write_drafter_kind(adapter, "gated")
    prompts = records(4)
    collect(loaded, prompts, config(model_dir), tmp_path / "plain")
    collect(loaded, prompts, config(model_dir, drafter=str(adapter)), tmp_path / "drafted")
    plain, drafted = (read_entries(tmp_path / name).to_pylist() for name in ("plain", "drafted"))
    assert [(e["prompt_id"], e["block_index"]) for e in drafted] == [(e["prompt_id"], e["block_index"]) for e in plain]
    for mine, target in zip(drafted, plain):
        assert mine["fixed_point"] == target["fixed_point"] and mine["prefix_ids"] == target["prefix_ids"]
        assert mine["states"][0] == target["states"][0] and mine["states"][-1] == mine["fixed_point"]
        right = [next((i for i, (a, b) in enumerate(zip(s, mine["fixed_point"])) if a != b), len(s))
                 for s in mine["states"]]
        # each step fixes a token or more; a state may equal the fixed point a step before the end,
        # its last token guessed right (only the target's own forward settles it)
        assert all(later > earlier or later == len(mine["fixed_point"]) for earlier, later in zip(right, right[1:]))
    assert any(m["states"] != t["states"] for m, t in zip(drafted, plain))  # the drafter's guesses, not the target's
    collect(loaded, prompts, config(model_dir, drafter=str(adapter), init="lookup"), tmp_path / "lookup")
    looked_up = read_entries(tmp_path / "lookup").to_pylist()  # the states drafted:N:lookup meets
    assert [e["fixed_point"] for e in looked_up] == [e["fixed_point"] for e in plain]
    with pytest.raises(CllmError, match="drafter"):  # resuming with another drafter (none) would mix two kinds
        collect(loaded, prompts, config(model_dir), tmp_path / "drafted")
