"""`cllm train` end to end on a tiny model: saved model loads everywhere, resume after SIGKILL, LoRA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import generate_ids, save_tiny_model, tiny_model
from transformers import AutoModelForCausalLM

from cllm.cli import main
from cllm.errors import CllmError

CLLM = [sys.executable, "-m", "cllm.cli"]


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--pack", "entry"],
        ["--teacher", "--distill-weight", "1", "--pack", "none"],
        ["--states-per-block", "3", "--warmup-steps", "0.5", "--distance", "argmax_ce"],
        ["--lora", "--lora-rank", "4", "--teacher", "--distill-weight", "0.5"],
        ["--loss", "lc", "--distance", "jsd"],
        ["--bf16", "--gradient-checkpointing"],
    ],
)
def test_train_saves_a_model_every_command_loads(collection, tmp_path, capsys, extra):
    model, trajectories = collection
    out = tmp_path / "cllm"
    assert main(["train", "--model", str(model), "--trajectories", str(trajectories), "--out", str(out),
                 "--max-steps", "4", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", *extra]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    facts = json.loads((out / "config.json").read_text())["cllm"]  # what the directory is, for other tools
    assert (facts["kind"], facts["target"], facts["block_sizes"], facts["steps"]) == ("cllm", str(model), [4], 4)
    assert "cllm eval fidelity --model THIS_DIR" in (out / "README.md").read_text()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["teacher"] == ("replica" if "--teacher" in extra else None)  # "sharded" under FSDP and ZeRO-3 only
    assert generate_ids(out, "jacobi", capsys) == generate_ids(out, "ar", capsys)
    trained, base = load_file(out / "model.safetensors"), load_file(model / "model.safetensors")
    assert any(not torch.equal(trained[name], base[name]) for name in base), "training changed no weight"


@pytest.mark.heavy
def test_resume_after_sigkill_continues_from_the_last_checkpoint(collection, tmp_path):
    model, trajectories = collection
    out = tmp_path / "cllm"
    args = ["train", "--model", str(model), "--trajectories", str(trajectories), "--out", str(out),
            "--max-steps", "400", "--save-steps", "20", "--lr", "1e-4"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen(CLLM + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not list((out / "checkpoints").glob("checkpoint-40")) and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    # The kill may land in the middle of writing checkpoint-40: only checkpoints whose state file
    # (written last) is complete count.
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*") if _complete(p))
    assert saved and saved[-1] < 400, "the kill must land before the end"

    resumed = subprocess.run(CLLM + args + ["--resume"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {out / 'checkpoints' / f'checkpoint-{saved[-1]}'}" in resumed.stderr
    state = json.loads((out / "checkpoints" / "checkpoint-400" / "trainer_state.json").read_text())
    assert state["global_step"] == 400
    assert (out / "model.safetensors").is_file()


def _complete(checkpoint) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


@pytest.mark.parametrize("kind, extra", [("rows", ["--teacher", "--ar-weight", "0"]), ("gated", ["--gated"]),
                                         ("gated", ["--gated", "--lora-targets", "down_proj,o_proj"])])
def test_train_adapter_only_saves_a_drafter(collection, tmp_path, capsys, kind, extra):
    """--lora --adapter-only writes the unmerged adapter (and how it drafts), which --drafter loads:
    drafted Jacobi with it returns the model's own output; --lora-targets adapts only the projections named."""
    model, trajectories = collection
    out = tmp_path / "drafter"
    assert main(["train", "--model", str(model), "--trajectories", str(trajectories), "--out", str(out),
                 "--max-steps", "3", "--lr", "1e-2", "--lora", "--lora-rank", "4", "--adapter-only", "--bf16",
                 *extra]) == 0
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    assert json.loads((out / "drafter.json").read_text()) == {"kind": kind}
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card and "--drafter THIS_DIR" in card
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all(t.dtype == torch.bfloat16 for t in adapter.values())
    assert any(float(t.abs().max()) > 0 for name, t in adapter.items() if "lora_B" in name), "training changed nothing"
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapter}
    every = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert adapted == ({"down_proj", "o_proj"} if "--lora-targets" in extra else every)
    capsys.readouterr()
    assert main(["generate", "hello", "--model", str(model), "--drafter", str(out), "--json",
                 "--max-new-tokens", "20"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == generate_ids(model, "ar", capsys)
    assert repr(str(out.resolve())) in (out / "custom_generate" / "generate.py").read_text()  # drafts with it
    _check_custom_generate(model, out)  # transformers users: the target's generate, drafted by this adapter
    assert main(["train", "--model", str(model), "--trajectories", str(trajectories), "--out", str(tmp_path / "o"),
                 "--adapter-only"]) == 2
    assert main(["train", "--model", str(model), "--trajectories", str(trajectories), "--out", str(tmp_path / "o"),
                 "--lora", "--lora-targets", "nope_proj", "--max-steps", "1"]) == 2
    assert "no projection named nope_proj" in capsys.readouterr().err


def test_the_gated_student_is_the_gated_drafter_of_decoding(collection):
    """What the gated trainer trains (the student's logits at a block) is what drafted decoding
    drafts there: the adapter on at the block's columns after the target's KV of the context."""
    from tiny_models import tiny_adapter

    from cllm.collate import TrajectoryCollator
    from cllm.training import GatedDrafterTrainer
    from cllm.trajectories import load_trajectories

    _, trajectories = collection
    entries = [load_trajectories(str(trajectories))[i] for i in (0, 1, 2)]
    inputs = TrajectoryCollator(pad_token_id=0, eos_token_ids=[1])(entries)
    target = tiny_model("qwen2", seed=3)
    drafter = tiny_adapter(target, seed=4, gated=True)  # as decoding loads it: PEFT's layers folded
    trained = tiny_adapter(target, seed=4, gated=True, folded=False)  # the same weights, as training runs them
    trainer = GatedDrafterTrainer.__new__(GatedDrafterTrainer)  # only its forward, no training run
    trainer.gate = trained.gate
    student, targets = trainer._gated_logits(trained.model, inputs)
    n = inputs["block_mask"].shape[1]
    for row in range(len(entries)):
        real = inputs["student_mask"][row].bool()
        ids = inputs["student_ids"][row][real][None]
        context = ids.shape[1] - int(real[-n:].sum())
        store = drafter.store(ids.shape[1])
        store.forward(ids[:, :context], torch.arange(context)[None], None)
        width = ids.shape[1] - context
        store.forward(ids[:, context:], torch.arange(context, ids.shape[1])[None], None)
        assert width >= 3  # decoding drafts a block of 3 columns or more, every column but the last
        torch.testing.assert_close(student[row, : width - 1], store.draft_logits[0, :-1], rtol=1e-4, atol=1e-4)
        expected_targets = target(input_ids=inputs["target_ids"][row][real][None]).logits[0, context:]
        torch.testing.assert_close(targets[row, :width], expected_targets, rtol=1e-4, atol=1e-4)


def test_train_bad_input(collection, tmp_path):
    model, trajectories = collection
    assert (
        main(["train", "--model", str(model), "--trajectories", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert main(["train", "--model", str(model), "--trajectories", str(trajectories), "--out", str(tmp_path / "o"),
                 "--beta", "1.5"]) == 2
    assert main(["train", "--model", str(model), "--trajectories", str(trajectories), "--out", str(tmp_path / "o"),
                 "--pack", "none", "--states-per-block", "2"]) == 2


def test_gradient_accumulation_gives_the_gradient_of_one_big_batch(collection, tmp_path):
    """One SGD step on 4 entries: batch 4 == 2 micro-batches of 2 (losses use the window's counts)."""
    from transformers import TrainingArguments

    from cllm.collate import TrajectoryCollator
    from cllm.models import load_model
    from cllm.training import CllmTrainer
    from cllm.trajectories import load_trajectories

    model_dir, trajectories = collection
    dataset = load_trajectories(trajectories).select(range(4))
    weights = []
    for batch_size, accumulation in ((4, 1), (2, 2), (1, 4)):
        loaded = load_model(str(model_dir))
        loaded.model.float()
        args = TrainingArguments(output_dir=str(tmp_path / f"b{batch_size}"), per_device_train_batch_size=batch_size,
                                 gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.5, optim="sgd",
                                 lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
                                 remove_unused_columns=False, disable_tqdm=True, seed=0, max_grad_norm=0.0)
        collator = TrajectoryCollator(pad_token_id=loaded.pad_token_id, eos_token_ids=loaded.eos_token_ids, seed=0)
        CllmTrainer(model=loaded.model, args=args, train_dataset=dataset, data_collator=collator).train()
        weights.append(torch.cat([p.detach().flatten() for p in loaded.model.parameters()]))
    assert not torch.allclose(
        weights[0], torch.cat([p.flatten() for p in load_model(str(model_dir)).model.parameters()])
    )
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights[2], weights[0], rtol=1e-4, atol=1e-5)


def loss_and_gradient(trainer, model, batch: dict, losses: list, gradients: list) -> None:
    """Appends the batch's loss and the flattened gradient of every parameter."""
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    losses.append(loss.detach())
    gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))


@pytest.mark.parametrize("arch,attention", [("llama", "sdpa"), ("qwen2", "eager"), ("gpt2", "sdpa"), ("gpt2", "eager")])
@pytest.mark.parametrize("distance,with_teacher", [("forward_kl", False), ("jsd", False), ("forward_kl", True)])
def test_one_packed_forward_gives_the_loss_and_gradient_of_three_forwards(
    collection, tmp_path, arch, attention, distance, with_teacher
):
    """Packing is a saving, not another objective: over a batch of entries of different lengths and
    blocks, the packed loss and every parameter's gradient equal those of the three forwards (with a
    frozen teacher too: its targets and the distillation term)."""
    from transformers import TrainingArguments

    from cllm.collate import TrajectoryCollator
    from cllm.training import CllmTrainer
    from cllm.trajectories import load_trajectories

    dataset = load_trajectories(collection[1])
    entries = [dataset[i] for i in range(0, len(dataset), max(1, len(dataset) // 5))]
    assert len({len(e["prefix_ids"]) for e in entries}) > 2
    model = tiny_model(arch, seed=5)  # float64, eval mode: no dropout, so both ways see the same network
    model.set_attn_implementation(attention)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True)
    teacher = None
    if with_teacher:
        teacher = tiny_model(arch, seed=6)
        teacher.set_attn_implementation(attention)
    trainer = CllmTrainer(
        model=model, args=args, distance=distance, teacher=teacher, distill_weight=0.5 if teacher else 0.0
    )
    # HF's eager attention gives NaN on left-padded float64 batches (the three-forward side): one entry at a time
    for batch_entries in [entries] if attention == "sdpa" else [[entry] for entry in entries]:
        losses, gradients = [], []
        for pack in (False, True):
            batch = TrajectoryCollator(pad_token_id=0, eos_token_ids=[1], seed=7, pack=pack)(batch_entries)
            loss_and_gradient(trainer, model, batch, losses, gradients)
        assert "packed_ids" in batch and losses[0] > 0 and gradients[0].abs().max() > 0
        # eager: softmax in float32; the losses sum in float32 (the teacher's terms add more of those sums)
        tolerance = {} if attention == "sdpa" and not teacher else {"rtol": 1e-4, "atol": 1e-5}
        torch.testing.assert_close(losses[1], losses[0], **tolerance)
        torch.testing.assert_close(gradients[1], gradients[0], **tolerance)


@pytest.mark.parametrize("arch,attention", [("llama", "sdpa"), ("gpt2", "eager")])
def test_packing_a_prompt_s_blocks_into_one_row_gives_the_loss_and_gradient_of_one_row_per_block(
    collection, tmp_path, arch, attention
):
    """--pack prompt: every block of a prompt in one row, each block the logits it has alone;
    over one prompt the loss (the AR term is a per-token mean of the same output) and gradient equal."""
    from transformers import TrainingArguments

    from cllm.collate import PromptGroups, TrajectoryCollator
    from cllm.training import CllmTrainer
    from cllm.trajectories import load_trajectories

    groups = PromptGroups(load_trajectories(collection[1]))
    sizes = [len(groups[i]) for i in range(len(groups))]
    assert len(groups) == 4 and max(sizes) > 1 and sum(sizes) == len(groups.entries)
    model = tiny_model(arch, seed=5)
    model.set_attn_implementation(attention)
    trainer = CllmTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    # the losses sum in float32, and the AR term sums one copy of the output here, one per block there
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if attention == "sdpa" else {"rtol": 1e-4, "atol": 1e-5}
    largest = groups[sizes.index(max(sizes))]
    losses, gradients = [], []
    for items in (largest, [largest]):  # one row per block, then one row for the prompt
        batch = TrajectoryCollator(pad_token_id=0, eos_token_ids=[1], seed=7, pack=True)(items)
        loss_and_gradient(trainer, model, batch, losses, gradients)
    assert batch["packed_ids"].shape[0] == 1 and batch["block_mask"].shape[0] == len(largest)
    torch.testing.assert_close(losses[1], losses[0], **tolerance)
    torch.testing.assert_close(gradients[1], gradients[0], **tolerance)
    # rows of different lengths and block counts in one batch: each block still sees only its own context
    prompts = [groups[i] for i in sorted(range(len(groups)), key=lambda i: sizes[i])[-2:][::-1]]
    with torch.no_grad():
        apart = trainer._packed_logits(model, TrajectoryCollator(pad_token_id=0, eos_token_ids=[1], seed=3, pack=True)(
            [entry for group in prompts for entry in group]))
        together = trainer._packed_logits(
            model, TrajectoryCollator(pad_token_id=0, eos_token_ids=[1], seed=3, pack=True)(prompts)
        )
    torch.testing.assert_close(together[0], apart[0], **tolerance)
    torch.testing.assert_close(together[1], apart[1], **tolerance)


def test_several_states_of_a_block_in_one_row_each_get_the_logits_they_have_alone(collection, tmp_path):
    """--states-per-block K: K distinct states of every block side by side after prompt + l; each
    state's student logits equal those of a row holding that state alone."""
    from transformers import TrainingArguments

    from cllm.collate import PromptGroups, TrajectoryCollator
    from cllm.training import CllmTrainer
    from cllm.trajectories import load_trajectories

    groups = PromptGroups(load_trajectories(collection[1]))
    group = max((groups[i] for i in range(len(groups))), key=len)
    candidates = {i: [s for s in e["states"][:-1] + list(e["augmented_states"] or []) if s != e["fixed_point"]]
                  for i, e in enumerate(group)}
    assert max(len(c) for c in candidates.values()) > 1
    model = tiny_model("llama", seed=5)
    trainer = CllmTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    batch = TrajectoryCollator(pad_token_id=0, eos_token_ids=[1], pack=True, states_per_block=1000)([group])
    assert batch["block_mask"].shape[0] == sum(max(1, len(c)) for c in candidates.values())  # every state, once
    with torch.no_grad():
        together = trainer._packed_logits(model, batch)[0]
        inputs = batch["packed_ids"].flatten()
        for i, entry in enumerate(group):
            for state in candidates[i]:
                alone_batch = TrajectoryCollator(pad_token_id=0, eos_token_ids=[1], pack=True)(
                    [{**entry, "states": [state, entry["fixed_point"]], "augmented_states": []}])
                alone = trainer._packed_logits(model, alone_batch)[0][0]
                columns = alone_batch["student_columns"][0]  # the last prefix column is the same in both rows
                tokens = alone_batch["packed_ids"].flatten()[columns[1:]].tolist()
                matches = [g for g in range(len(together)) if int(batch["student_columns"][g, 0]) == int(columns[0])
                           and inputs[batch["student_columns"][g, 1 : len(columns)]].tolist() == tokens]
                assert matches
                torch.testing.assert_close(together[matches[0], : len(alone)], alone, rtol=1e-5, atol=1e-6)


def test_the_log_shows_the_mean_loss_terms_since_the_last_log(tmp_path):
    from transformers import TrainingArguments

    from cllm.training import CllmTrainer

    trainer = CllmTrainer(
        model=tiny_model("llama", seed=5), args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    )
    for consistency, autoregressive, distill in ((1.0, 4.0, 0.5), (3.0, 2.0, 1.5)):
        trainer._remember_terms(
            torch.tensor(consistency), torch.tensor(autoregressive), torch.tensor(distill), None, {}
        )
    trainer.log({"loss": 5.0})
    trainer._remember_terms(torch.tensor(0.5), torch.tensor(0.25), None, None, {})  # no teacher: no distill term
    trainer.log({"loss": 0.75})
    first, second = trainer.state.log_history[-2:]
    assert (first["consistency_loss"], first["ar_loss"], first["distill_loss"]) == (2.0, 3.0, 1.0)
    assert (second["consistency_loss"], second["ar_loss"]) == (0.5, 0.25) and "distill_loss" not in second


def test_packing_keeps_the_block_when_the_sequence_is_cut_to_max_length(collection):
    from cllm.collate import IGNORE, TrajectoryCollator
    from cllm.trajectories import load_trajectories

    dataset = load_trajectories(collection[1])
    entry = max((dataset[i] for i in range(len(dataset))), key=lambda e: len(e["prefix_ids"]))
    batch = TrajectoryCollator(pad_token_id=0, eos_token_ids=[1], max_length=len(entry["prefix_ids"]) - 2, pack=True)(
        [entry]
    )
    n = len(entry["fixed_point"])
    target_tokens = batch["packed_ids"][0, batch["target_columns"][0] + 1][: n - 1]
    assert target_tokens.tolist() == entry["fixed_point"][: n - 1]
    assert batch["packed_ids"].shape[1] < len(entry["prompt_ids"]) + len(entry["teacher_output_ids"]) + n - 1
    assert (batch["labels"][0] != IGNORE).any()


def test_resume_skips_a_checkpoint_killed_while_being_written(tmp_path):
    from cllm.training import last_complete_checkpoint

    (tmp_path / "checkpoint-20").mkdir()
    (tmp_path / "checkpoint-20" / "trainer_state.json").write_text('{"global_step": 20}')
    (tmp_path / "checkpoint-40").mkdir()
    (tmp_path / "checkpoint-40" / "model.safetensors").write_text("half")
    (tmp_path / "checkpoint-60").mkdir()
    (tmp_path / "checkpoint-60" / "trainer_state.json").write_text('{"global_st')

    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-20")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20"]
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_transformers_users_get_jacobi_from_the_saved_directory(collection, tmp_path):
    """generate(custom_generate=OUT, trust_remote_code=True) on the saved CLLM runs cllm's Jacobi
    decoder: the same ids as transformers' own greedy generate, prompts (left-padded) included."""
    model_dir, trajectories = collection
    out = tmp_path / "cllm"
    assert main(["train", "--model", str(model_dir), "--trajectories", str(trajectories), "--out", str(out),
                 "--max-steps", "2", "--lr", "1e-3"]) == 0
    _check_custom_generate(out, out)


def _check_custom_generate(model_dir: Path, out: Path) -> None:
    """The model in `model_dir`, generating through `out`'s custom_generate, gives the ids of
    transformers' own greedy generate, prompts (left-padded) included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    batch = tokenizer(["hello world", "abc xyz abc"], return_tensors="pt", padding=True)
    greedy = model.generate(**batch, max_new_tokens=12, do_sample=False)
    jacobi = model.generate(**batch, max_new_tokens=12, custom_generate=str(out), trust_remote_code=True,
                            block_size=4)  # a keyword only the custom function takes
    pad = model.generation_config.pad_token_id or 0
    for want, got in zip(greedy.tolist(), jacobi.tolist()):
        assert got[:len(want)] == want and set(got[len(want):]) <= {pad}


def test_init_adapter_starts_from_the_saved_adapters_weights(tmp_path):
    from tiny_models import save_tiny_adapter

    from cllm.drafters import write_drafter_kind
    from cllm.training import _with_lora

    target = save_tiny_model(tmp_path / "target", arch="llama", seed=2)
    saved = save_tiny_adapter(target, tmp_path / "adapter", seed=3, rank=4)
    weights = load_file(saved / "adapter_model.safetensors")
    model = _with_lora(AutoModelForCausalLM.from_pretrained(target), 4, "", str(saved))
    loaded = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert len(loaded) == len(weights) and all(p.requires_grad for p in loaded.values())
    for name, tensor in weights.items():  # PEFT names them without the adapter's name
        assert torch.equal(loaded[name.replace(".weight", ".default.weight")], tensor)
    fresh = AutoModelForCausalLM.from_pretrained(target)
    with pytest.raises(CllmError, match="pass the same --lora-rank"):
        _with_lora(fresh, 8, "", str(saved))
    with pytest.raises(CllmError, match="a rows drafter; train it without --gated"):
        _with_lora(fresh, 4, "", str(saved), gated=True)
    write_drafter_kind(saved, "gated")
    with pytest.raises(CllmError, match="a gated drafter; train it with --gated"):
        _with_lora(fresh, 4, "", str(saved))
    with pytest.raises(CllmError, match="not a LoRA adapter directory"):
        _with_lora(fresh, 4, "", str(tmp_path))
