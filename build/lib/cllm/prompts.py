"""Prompt inputs for the CLI: a built-in mixed set, JSONL files and stdin."""

from __future__ import annotations

from pathlib import Path

from cllm.errors import CllmError

# Ten varied prompts (math, code, chat, writing, facts, lists) used by `cllm bench`, `cllm demo`
# and the real-model exactness tests when no prompts file is given.
BUILTIN_PROMPTS: list[str] = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "What is the capital of France? Answer in one sentence and add one fact about it.",
    "Explain in simple terms why the sky is blue.",
    "Give me three tips for staying focused while studying.",
    "Write a short poem about the ocean at night.",
    "A train travels 60 miles per hour for 3 hours. How far does it travel? Show your steps.",
    "Translate to French: 'The weather is nice today and I want to go for a walk.'",
    "List the planets of the solar system in order from the Sun.",
    "Write a SQL query that returns the ten most recent orders from a table named orders.",
]

DEMO_PROMPTS: list[str] = BUILTIN_PROMPTS[:3]


def read_prompts_jsonl(path: str | Path, field: str = "prompt") -> list[str]:
    """Prompts from a JSONL file with one `{"prompt": ...}` object per line (blank lines skipped)."""
    from cllm.data import SourceOptions, jsonl

    prompts = [record.text for record in jsonl(SourceOptions(path=str(path), prompt_field=field))]
    if not prompts:
        raise CllmError(f"{path} holds no prompts")
    return prompts
