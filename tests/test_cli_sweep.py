"""Every command with bad input: one line on stderr, exit status 2, no traceback, nothing half-written.

In-process (an uncaught exception fails the test by itself), on a tiny model and a tiny collection;
the few cases that need a real process (stdout on a full disk) run one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_models import save_tiny_model

from cllm.cli import COMMANDS, main

CLLM = [sys.executable, "-m", "cllm.cli"]
UNWRITABLE = "/proc/cllm-test/out"  # /proc refuses new files even to root


@dataclass
class World:
    root: Path
    model: Path
    trajectories: Path

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / "inputs" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def dir(self, name: str) -> Path:
        path = self.root / "inputs" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def damaged_checkpoint(self) -> Path:
        """A training run whose last checkpoint finished but whose weights were damaged later."""
        out = self.dir("run-with-damaged-checkpoint")
        checkpoint = out / "checkpoints" / "checkpoint-1"
        checkpoint.mkdir(parents=True, exist_ok=True)
        (checkpoint / "trainer_state.json").write_text("{}")
        (checkpoint / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
        return out

    def damaged_collection(self, name: str, damage) -> Path:
        copy = self.root / "inputs" / name
        if not copy.exists():
            shutil.copytree(self.trajectories, copy)
            damage(next((copy / "data").glob("*.parquet")))
        return copy


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("sweep")
    model = save_tiny_model(root / "model", eos_token_id=None)
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["abc", "hello"]) + "\n")
    trajectories = root / "trajectories"
    assert (
        main(
            [
                "collect",
                "--model",
                str(model),
                "--dataset",
                "jsonl",
                "--path",
                str(prompts),
                "--out",
                str(trajectories),
                "--block-size",
                "4",
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    return World(root, model, trajectories)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def foreign(path: Path) -> None:
    pq.write_table(pa.table({"name": ["x"], "value": [1]}), path)


# (id, argv builder, what the one line must say). M: the tiny model; stdin: text fed to "-".
CASES = [
    # generate
    ("generate stdin not UTF-8", lambda w: ["generate", "-"], "UTF-8"),
    ("generate --file is a directory", lambda w: ["generate", "--file", str(w.dir("d"))], "directory"),
    (
        "generate --file not UTF-8",
        lambda w: ["generate", "--file", str(w.file("bad.jsonl", b'{"prompt": "\xff"}\n'))],
        "UTF-8",
    ),
    (
        "generate --file broken JSON",
        lambda w: ["generate", "--file", str(w.file("broken.jsonl", "{ nope\n"))],
        ":1: not valid JSON",
    ),
    (
        "generate --file without prompt field",
        lambda w: ["generate", "--file", str(w.file("nofield.jsonl", '{"q": 1}\n'))],
        "prompt",
    ),
    ("generate --file empty", lambda w: ["generate", "--file", str(w.file("empty.jsonl", ""))], "no prompt"),
    (
        "generate --model is a plain file",
        lambda w: ["generate", "hi", "--model", str(w.file("plain.txt", "hello"))],
        "model",
    ),
    ("generate --ngram 1", lambda w: ["generate", "hi", "--decoder", "lookahead", "--ngram", "1"], "--ngram"),
    (
        "generate --candidates 0",
        lambda w: ["generate", "hi", "--decoder", "jacobi", "--candidates", "0"],
        "--candidates",
    ),
    (
        "generate hf-pld batched",
        lambda w: [
            "generate",
            "--file",
            str(w.file("two.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n')),
            "--decoder",
            "hf-pld",
            "--batch-size",
            "2",
        ],
        "--batch-size 1",
    ),
    ("generate --threads 0", lambda w: ["generate", "hi", "--threads", "0"], "--threads"),
    ("generate --temperature negative", lambda w: ["generate", "hi", "--temperature", "-0.5"], "--temperature"),
    ("generate --temperature nan", lambda w: ["generate", "hi", "--temperature", "nan"], "--temperature"),
    ("generate --top-p 0", lambda w: ["generate", "hi", "--temperature", "1", "--top-p", "0"], "--top-p"),
    ("generate --top-p above 1", lambda w: ["generate", "hi", "--top-p", "1.5"], "--top-p"),
    ("generate --top-k negative", lambda w: ["generate", "hi", "--top-k", "-1"], "--top-k"),
    ("generate --seed not a number", lambda w: ["generate", "hi", "--seed", "x"], "--seed"),
    # bench
    (
        "bench --out is a file",
        lambda w: ["bench", "--out", str(w.file("f.txt", "x")), "--limit", "1"],
        "not a directory",
    ),
    ("bench --out unwritable", lambda w: ["bench", "--out", UNWRITABLE, "--limit", "1"], "cannot"),
    ("generate --quantize int4", lambda w: ["generate", "hi", "--quantize", "int4"], "--quantize"),
    (
        "bench llamacpp on a Hugging Face model",
        lambda w: ["bench", "--decoders", "ar,llamacpp", "--limit", "1", "--out", str(w.root / "b")],
        "GGUF",
    ),
    (
        "bench llamacpp sampled",
        lambda w: [
            "bench",
            "--decoders",
            "llamacpp",
            "--temperature",
            "0.5",
            "--limit",
            "1",
            "--out",
            str(w.root / "b"),
        ],
        "greedily",
    ),
    ("bench --prompts is a directory", lambda w: ["bench", "--prompts", str(w.dir("d"))], "directory"),
    (
        "bench --prompts not UTF-8",
        lambda w: ["bench", "--prompts", str(w.file("bad.jsonl", b'{"prompt": "\xff"}\n'))],
        "UTF-8",
    ),
    ("bench --prompts missing", lambda w: ["bench", "--prompts", str(w.root / "missing.jsonl")], "not found"),
    ("bench bad decoder spec", lambda w: ["bench", "--decoders", "jacobi:x"], "jacobi:x"),
    ("bench lookahead spec incomplete", lambda w: ["bench", "--decoders", "lookahead:5"], "lookahead:W:N:G"),
    ("bench hf-assisted without a draft", lambda w: ["bench", "--decoders", "hf-assisted"], "--draft-model"),
    (
        "bench --draft-model is a plain file",
        lambda w: [
            "bench",
            "--decoders",
            "hf-assisted",
            "--limit",
            "1",
            "--draft-model",
            str(w.file("plain.txt", "hello")),
        ],
        "model",
    ),
    ("bench --temperature negative", lambda w: ["bench", "--temperature", "-1"], "--temperature"),
    ("bench --top-p negative", lambda w: ["bench", "--top-p", "-0.1"], "--top-p"),
    ("bench --top-k not an integer", lambda w: ["bench", "--top-k", "2.5"], "--top-k"),
    ("bench --dataset unknown", lambda w: ["bench", "--dataset", "nope"], "unknown dataset"),
    (
        "bench --path broken JSON",
        lambda w: ["bench", "--dataset", "gsm8k", "--path", str(w.file("g.jsonl", "{ nope\n"))],
        ":1: not valid JSON",
    ),
    # collect
    (
        "collect --out is a file",
        lambda w: ["collect", "--dataset", "gsm8k", "--out", str(w.file("f.txt", "x"))],
        "not a directory",
    ),
    ("collect --out unwritable", lambda w: ["collect", "--dataset", "gsm8k", "--out", UNWRITABLE], "cannot"),
    (
        "collect --path is a directory",
        lambda w: ["collect", "--dataset", "jsonl", "--path", str(w.dir("d")), "--out", str(w.root / "c1")],
        "directory",
    ),
    (
        "collect --path not UTF-8",
        lambda w: [
            "collect",
            "--dataset",
            "jsonl",
            "--path",
            str(w.file("bad.jsonl", b'{"prompt": "\xff"}\n')),
            "--out",
            str(w.root / "c2"),
        ],
        "UTF-8",
    ),
    (
        "collect jsonl without --path",
        lambda w: ["collect", "--dataset", "jsonl", "--out", str(w.root / "c3")],
        "--path",
    ),
    (
        "collect --prompt-field missing",
        lambda w: [
            "collect",
            "--dataset",
            "jsonl",
            "--path",
            str(w.file("p.jsonl", '{"prompt": "a"}\n')),
            "--prompt-field",
            "nope",
            "--out",
            str(w.root / "c4"),
        ],
        "nope",
    ),
    (
        "collect --shard-index out of range",
        lambda w: [
            "collect",
            "--dataset",
            "gsm8k",
            "--out",
            str(w.root / "c5"),
            "--shard-index",
            "5",
            "--num-shards",
            "2",
        ],
        "--shard-index",
    ),
    (
        "collect into a truncated collection",
        lambda w: [
            "collect",
            "--dataset",
            "jsonl",
            "--path",
            str(w.root / "prompts.jsonl"),
            "--out",
            str(w.damaged_collection("trunc", truncate)),
            "--block-size",
            "4",
            "--max-new-tokens",
            "8",
        ],
        "unreadable",
    ),
    # train
    (
        "train --trajectories is a file",
        lambda w: ["train", "--trajectories", str(w.file("f.txt", "x")), "--out", str(w.root / "t1")],
        "not a directory",
    ),
    (
        "train --trajectories truncated",
        lambda w: [
            "train",
            "--trajectories",
            str(w.damaged_collection("trunc", truncate)),
            "--out",
            str(w.root / "t2"),
        ],
        "unreadable",
    ),
    (
        "train --trajectories foreign parquet",
        lambda w: [
            "train",
            "--trajectories",
            str(w.damaged_collection("foreign", foreign)),
            "--out",
            str(w.root / "t3"),
        ],
        "columns",
    ),
    (
        "train --trajectories not a collection",
        lambda w: ["train", "--trajectories", str(w.dir("d")), "--out", str(w.root / "t4")],
        "collection",
    ),
    (
        "train --out is a file",
        lambda w: ["train", "--trajectories", str(w.trajectories), "--out", str(w.file("f.txt", "x"))],
        "not a directory",
    ),
    (
        "train --out unwritable",
        lambda w: ["train", "--trajectories", str(w.trajectories), "--out", UNWRITABLE],
        "cannot",
    ),
    (
        "train --lr negative",
        lambda w: ["train", "--trajectories", str(w.trajectories), "--out", str(w.root / "t5"), "--lr", "-1"],
        "--lr",
    ),
    (
        "train --distill-weight without --teacher",
        lambda w: [
            "train",
            "--trajectories",
            str(w.trajectories),
            "--out",
            str(w.root / "t6"),
            "--distill-weight",
            "1",
        ],
        "--teacher",
    ),
    (
        "train --resume from a damaged checkpoint",
        lambda w: [
            "train",
            "--trajectories",
            str(w.trajectories),
            "--resume",
            "--out",
            str(w.damaged_checkpoint()),
            "--max-steps",
            "2",
        ],
        "damaged",
    ),
    # data inspect
    ("data inspect a file", lambda w: ["data", "inspect", str(w.file("f.txt", "x"))], "not a directory"),
    (
        "data inspect truncated",
        lambda w: ["data", "inspect", str(w.damaged_collection("trunc", truncate))],
        "unreadable",
    ),
    (
        "data inspect foreign parquet",
        lambda w: ["data", "inspect", str(w.damaged_collection("foreign", foreign))],
        "columns",
    ),
    ("data inspect an empty directory", lambda w: ["data", "inspect", str(w.dir("empty-dir"))], "collection"),
    (
        "data inspect corrupt manifest",
        lambda w: [
            "data",
            "inspect",
            str(
                w.damaged_collection("manifest", lambda p: (p.parent.parent / "cllm_manifest.json").write_text("{ no"))
            ),
        ],
        "corrupt",
    ),
    # eval
    ("eval perplexity --text is a directory", lambda w: ["eval", "perplexity", "--text", str(w.dir("d"))], "directory"),
    (
        "eval perplexity --text not UTF-8",
        lambda w: ["eval", "perplexity", "--text", str(w.file("bad.txt", b"\xff\xfe abc"))],
        "UTF-8",
    ),
    (
        "eval --out on a full disk",
        lambda w: ["eval", "perplexity", "--text", str(w.file("t.txt", "hello world " * 5)), "--out", "/dev/full"],
        "No space left",
    ),
    (
        "eval --out is a directory",
        lambda w: ["eval", "perplexity", "--text", str(w.file("t.txt", "hello world " * 5)), "--out", str(w.dir("d"))],
        "directory",
    ),
    (
        "eval --out unwritable",
        lambda w: ["eval", "perplexity", "--text", str(w.file("t.txt", "hello world " * 5)), "--out", UNWRITABLE],
        "cannot",
    ),
    (
        "eval gsm8k --path broken JSON",
        lambda w: ["eval", "gsm8k", "--path", str(w.file("g.jsonl", "{ nope\n"))],
        ":1: not valid JSON",
    ),
    (
        "eval fidelity --target-outputs broken",
        lambda w: [
            "eval",
            "fidelity",
            "--target",
            str(w.model),
            "--dataset",
            "gsm8k",
            "--limit",
            "1",
            "--target-outputs",
            str(w.file("to.json", "{ nope")),
        ],
        "corrupt",
    ),
    (
        "eval mtbench --answers is a directory",
        lambda w: ["eval", "mtbench", "--limit", "1", "--answers", str(w.dir("d"))],
        "directory",
    ),
    ("eval gsm8k --temperature negative", lambda w: ["eval", "gsm8k", "--temperature", "-1"], "--temperature"),
    ("eval gsm8k --top-p above 1", lambda w: ["eval", "gsm8k", "--top-p", "2"], "--top-p"),
    (
        "eval fidelity sampled",
        lambda w: ["eval", "fidelity", "--target", str(w.model), "--temperature", "0.7"],
        "greedy",
    ),
    ("eval humaneval --timeout negative", lambda w: ["eval", "humaneval", "--timeout", "-1"], "--timeout"),
    # viz
    ("viz --out is a file", lambda w: ["viz", "hi", "--out", str(w.file("f.txt", "x"))], "not a directory"),
    ("viz empty prompt", lambda w: ["viz", " "], "empty prompt"),
    # distill
    ("distill recipe is a directory", lambda w: ["distill", str(w.dir("d"))], "directory"),
    ("distill recipe missing", lambda w: ["distill", str(w.root / "missing.yaml")], "not found"),
    ("distill broken YAML", lambda w: ["distill", str(w.file("broken.yaml", "model: [unclosed\n"))], "YAML"),
    ("distill YAML that is a list", lambda w: ["distill", str(w.file("list.yaml", "- a\n- b\n"))], "mapping"),
    ("distill recipe not UTF-8", lambda w: ["distill", str(w.file("bad.yaml", b"model: \xff\n"))], "UTF-8"),
    (
        "distill unknown key",
        lambda w: ["distill", str(w.file("unknown.yaml", "out: x\nmodel: default\nfrobnicate: 1\n"))],
        "frobnicate",
    ),
    ("viz prompt not UTF-8", lambda w: ["viz", "caf\udcff"], "not valid UTF-8"),
    ("generate prompt argument not UTF-8", lambda w: ["generate", "caf\udcff"], "not valid UTF-8"),
    # serve, chat, serve-bench
    ("serve --decoder hf", lambda w: ["serve", "--decoder", "hf"], "--decoder"),
    ("serve --port negative", lambda w: ["serve", "--port", "-1"], "--port"),
    ("serve --max-batch 0", lambda w: ["serve", "--max-batch", "0"], "--max-batch"),
    ("serve --request-timeout 0", lambda w: ["serve", "--request-timeout", "0"], "--request-timeout"),
    ("serve --temperature negative", lambda w: ["serve", "--temperature", "-1"], "--temperature"),
    ("serve model missing", lambda w: ["serve", "--model", str(w.root / "no-such-model")], "not found"),
    ("chat --max-new-tokens 0", lambda w: ["chat", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("chat model missing", lambda w: ["chat", "--model", str(w.root / "no-such-model")], "not found"),
    ("serve-bench --concurrency 0", lambda w: ["serve-bench", "--concurrency", "1,0"], "--concurrency"),
    ("serve-bench --decoders hf", lambda w: ["serve-bench", "--decoders", "ar,hf"], "cannot serve"),
    ("serve-bench --out is a file", lambda w: ["serve-bench", "--out", str(w.file("f.txt", "x"))], "not a directory"),
    (
        "serve-bench --url unreachable",
        lambda w: ["serve-bench", "--url", "http://127.0.0.1:9/v1", "--out", str(w.root / "sb")],
        "cannot reach",
    ),
    # demo
    ("demo --cllm missing", lambda w: ["demo", "--cllm", str(w.root / "no-such-cllm")], "not found"),
]
MODEL_FREE = {"distill", "data"}


@pytest.mark.parametrize("name, build, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(name, build, message, world, capsys, monkeypatch):
    argv = build(world)
    if argv[0] not in MODEL_FREE and "--model" not in argv:
        argv += ["--model", str(world.model)]
    monkeypatch.setattr(
        sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe hello"), encoding="utf-8", errors="surrogateescape")
    )
    before = _tree(world.root)
    code = main(argv)
    stderr = capsys.readouterr().err.strip()
    assert code == 2, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error:"), stderr
    assert message in stderr, stderr
    assert _tree(world.root) == before, "output left behind"


def _tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def test_the_sweep_covers_every_command():
    assert len(CASES) >= 40
    assert {name.split()[0] for name, _, _ in CASES} == set(COMMANDS)


@pytest.mark.heavy
def test_stdout_on_a_full_disk_is_one_line(world):
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            CLLM + ["generate", "hi", "--model", str(world.model), "--max-new-tokens", "4"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ | {"HF_HUB_OFFLINE": "1"},
        )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "No space left" in result.stderr


@pytest.mark.heavy
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root to mount a small tmpfs")
@pytest.mark.parametrize(
    "command",
    [
        ["eval", "perplexity", "--text", "{text}", "--out", "{disk}/report.json"],
        [
            "collect",
            "--dataset",
            "jsonl",
            "--path",
            "{prompts}",
            "--out",
            "{disk}/collection",
            "--block-size",
            "4",
            "--max-new-tokens",
            "8",
        ],
        ["bench", "--prompts", "{prompts}", "--max-new-tokens", "4", "--decoders", "ar", "--out", "{disk}/bench"],
    ],
    ids=["eval", "collect", "bench"],
)
def test_a_full_disk_is_one_line_and_leaves_no_partial_file(world, command):
    """A 1 MiB tmpfs, filled up before the command starts, in a private mount namespace."""
    disk = world.root / "full-disk"
    disk.mkdir(exist_ok=True)
    text = world.file("text.txt", "hello world " * 20)
    argv = [a.format(disk=disk, text=text, prompts=world.root / "prompts.jsonl") for a in command]
    script = (f"mount -t tmpfs -o size=1m tmpfs {disk} && (cat /dev/zero > {disk}/filler 2>/dev/null; true) && "
              f"{' '.join(CLLM)} {' '.join(argv)} --model {world.model}; code=$?; "
              f"find {disk} -type f ! -name filler -printf 'left: %p\\n'; exit $code")
    result = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True,
                            env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "No space left" in result.stderr, result.stderr
    assert "left:" not in result.stdout, f"files left on the full disk: {result.stdout}"
