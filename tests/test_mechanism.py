"""Proof of mechanism: consistency training makes a model fast-forward in Jacobi decoding.

A tiny Llama is first trained (AR) on a synthetic language of strong collocations: each of 8
topic tokens is always followed by its own fixed 15-token phrase and EOS. Its Jacobi trajectories
are collected, then it is consistency-trained on them with `CllmTrainer`. Jacobi tokens per
forward must rise clearly while greedy outputs stay exactly what the trained model produces.
"""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from cllm.collate import TrajectoryCollator
from cllm.data import PromptRecord
from cllm.decoding import ar, jacobi, left_pad
from cllm.training import CllmTrainer
from cllm.trajectories import CollectConfig, build_entries

pytestmark = pytest.mark.heavy  # pretrains and trains a small model twice

PAD, BOS, EOS = 0, 1, 2
TOPICS = list(range(3, 11))
PHRASE_LENGTH = 15
BLOCK = 16


def synthetic_language(seed: int = 0) -> dict[int, list[int]]:
    rng = random.Random(seed)
    return {topic: [rng.randrange(11, 40) for _ in range(PHRASE_LENGTH)] for topic in TOPICS}


def ar_pretrain(phrases: dict[int, list[int]]) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = LlamaForCausalLM(config)
    sequences = torch.tensor([[BOS, t] + phrases[t] + [EOS] for t in TOPICS])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model(input_ids=sequences, labels=sequences).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def tokens_per_forward(model, seeds=range(4)) -> float:
    input_ids, mask = left_pad([[BOS, t] for t in TOPICS], PAD)
    tokens = forwards = 0
    for seed in seeds:
        out = jacobi(model, input_ids, mask, block_size=BLOCK, max_new_tokens=PHRASE_LENGTH + 1,
                     eos_token_id=EOS, pad_token_id=PAD, seed=1000 + seed * len(TOPICS))
        tokens += sum(s.new_tokens for s in out.stats)
        forwards += sum(s.forward_passes for s in out.stats)
    return tokens / forwards


def trajectories(model, seeds=range(16)) -> list[dict]:
    config = CollectConfig(model="tiny", dataset="synthetic", block_size=BLOCK, max_new_tokens=PHRASE_LENGTH + 1)
    prompts = [[BOS, t] for t in TOPICS]
    input_ids, mask = left_pad(prompts, PAD)
    entries = []
    for seed in seeds:
        out = jacobi(model, input_ids, mask, block_size=BLOCK, max_new_tokens=PHRASE_LENGTH + 1, eos_token_id=EOS,
                     pad_token_id=PAD, seed=[seed * 100 + i for i in range(len(TOPICS))], return_trajectory=True)
        for index, (prompt, tokens, blocks) in enumerate(zip(prompts, out.token_ids, out.trajectories)):
            record = PromptRecord(id=f"{seed}-{index}", text="")
            entries += build_entries(config, index, record, prompt, None, tokens, blocks)
    return entries


def test_consistency_training_raises_tokens_per_forward(tmp_path):
    phrases = synthetic_language()
    model = ar_pretrain(phrases)
    input_ids, mask = left_pad([[BOS, t] for t in TOPICS], PAD)
    greedy = ar(model, input_ids, mask, max_new_tokens=PHRASE_LENGTH + 1, eos_token_id=EOS, pad_token_id=PAD).token_ids
    assert greedy == [phrases[t] + [EOS] for t in TOPICS], "AR pre-training did not learn the language"
    before = tokens_per_forward(model)

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=150,
                             learning_rate=2e-3, lr_scheduler_type="constant", logging_steps=50, save_strategy="no",
                             report_to=[], use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=0)
    trainer = CllmTrainer(model=model.train(), args=args, train_dataset=Dataset.from_list(trajectories(model)),
                          data_collator=TrajectoryCollator(pad_token_id=PAD, eos_token_ids=[EOS]), ar_weight=1.0)
    trainer.train()
    model.eval()
    after = tokens_per_forward(model)
    print(f"tokens per forward: {before:.2f} -> {after:.2f}")
    assert after >= 1.5 * before

    trained_ar = ar(
        model, input_ids, mask, max_new_tokens=PHRASE_LENGTH + 1, eos_token_id=EOS, pad_token_id=PAD
    ).token_ids
    trained_jacobi = jacobi(model, input_ids, mask, block_size=BLOCK, max_new_tokens=PHRASE_LENGTH + 1,
                            eos_token_id=EOS, pad_token_id=PAD).token_ids
    assert trained_jacobi == trained_ar
    assert trained_ar == greedy, "the AR loss should keep the language intact"


def test_a_frozen_teacher_keeps_the_model_faithful_where_self_targets_let_it_drift(tmp_path):
    """Consistency training alone (no AR term), equal steps: with the paper's self-targets the
    student chases its own drifting fixed points and stops predicting the target's tokens; with a
    frozen teacher (its targets + KL(teacher || student) on its output) it keeps them and still
    learns to fast-forward."""
    import copy

    from cllm.fidelity import summarize_positions, teacher_forced_positions

    phrases = synthetic_language()
    target = ar_pretrain(phrases)
    entries = Dataset.from_list(trajectories(target))
    in_domain = [([BOS, t] + phrases[t] + [EOS], 2) for t in TOPICS]
    rng = random.Random(0)
    prompts = [[BOS] + [rng.randrange(3, 40) for _ in range(rng.randrange(1, 5))] for _ in range(32)]
    elsewhere = [
        (p + ar(target, torch.tensor([p]), max_new_tokens=16, eos_token_id=EOS, pad_token_id=PAD).token_ids[0], len(p))
        for p in prompts
    ]  # the target's own continuations of prompts it was never trained on
    before = tokens_per_forward(target)
    results = {}
    for name, extra in (("self", {}), ("teacher", {"teacher": copy.deepcopy(target), "distill_weight": 1.0})):
        model = copy.deepcopy(target).train()
        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=16, max_steps=150,
                                 learning_rate=2e-3, lr_scheduler_type="constant", save_strategy="no", report_to=[],
                                 use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=0)
        CllmTrainer(model=model, args=args, train_dataset=entries, ar_weight=0.0,
                    data_collator=TrajectoryCollator(pad_token_id=PAD, eos_token_ids=[EOS]), **extra).train()
        model.eval()
        results[name] = {
            "in_domain": summarize_positions(*teacher_forced_positions(model, target, in_domain))["same_top1"],
            "elsewhere": summarize_positions(*teacher_forced_positions(model, target, elsewhere))["same_top1"],
            "tokens_per_forward": tokens_per_forward(model),
        }
    print(results)
    assert results["teacher"]["in_domain"] >= 0.95 > 0.5 > results["self"]["in_domain"]
    assert results["teacher"]["elsewhere"] > results["self"]["elsewhere"] + 0.1
    assert results["teacher"]["tokens_per_forward"] >= 1.5 * before
