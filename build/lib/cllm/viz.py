"""Jacobi trajectories drawn like the paper's figure: every state a row of tokens, green where the
token already equals the block's fixed point, red where not; bold frame = fast-forwarded (accepted
in an iteration beyond the one token Jacobi always gains), underline = stationary (already right
while an earlier position was still wrong, and never changed again)."""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cllm.decoding import DecoderSpec, accepted_per_iteration, decode, stationary_mask
from cllm.files import write_atomically
from cllm.models import LoadedModel


@dataclass
class BlockView:
    states: list[list[str]]  # decoded token strings, state by state
    correct: list[list[bool]]
    fast_forwarded: list[list[bool]]  # accepted at this state's iteration as an extra token
    stationary: list[list[bool]]


def trajectory_views(
    loaded: LoadedModel, prompt: str, block_size: int, blocks: int, raw: bool = False,
    on_tokens: Callable[[int], None] | None = None,
) -> list[BlockView]:
    """The first `blocks` Jacobi blocks of the prompt's output; `on_tokens(count)` as it grows."""
    ids = loaded.encode_prompt(prompt, raw=raw)
    output = decode(loaded, DecoderSpec("jacobi", block_size=block_size), [ids], max_new_tokens=1 + block_size * blocks,
                    return_trajectory=True, on_tokens=None if on_tokens is None else lambda _, new: on_tokens(len(new)))
    return [_view(loaded, states) for states in output.trajectories[0][:blocks]]


def _view(loaded: LoadedModel, states: torch.Tensor) -> BlockView:
    correct = states == states[-1]
    fast = torch.zeros_like(correct)
    fixed = 0
    for step, accepted in enumerate(accepted_per_iteration(states), start=1):
        fast[step, fixed + 1 : fixed + accepted] = True
        fixed += accepted
    tokens = [[loaded.tokenizer.decode([t]) for t in row] for row in states.tolist()]
    return BlockView(tokens, correct.tolist(), fast.tolist(), stationary_mask(states).tolist())


def render_html(views: dict[str, list[BlockView]], prompt: str, path: Path) -> None:
    style = (
        "body{font-family:sans-serif} table{border-collapse:collapse;margin-bottom:1em} "
        "td{font-family:monospace;padding:2px 4px;border:1px solid #ddd;white-space:pre} "
        ".ok{background:#c8f0c8} .bad{background:#f4c4c4} .ff{outline:2px solid #1a5fb4} .st{text-decoration:underline}"
    )
    parts = [f"<html><head><meta charset='utf-8'><style>{style}</style></head><body>",
             f"<h2>Jacobi trajectories</h2><p><b>prompt:</b> {html.escape(prompt)}</p>",
             "<p>green: equals the fixed point; red: wrong; blue frame: fast-forwarded; underlined: stationary</p>"]
    for name, blocks in views.items():
        total = sum(len(b.states) - 1 for b in blocks)
        tokens = sum(len(b.states[0]) for b in blocks)
        parts.append(f"<h3>{html.escape(name)}: {tokens} tokens in {total} iterations "
                     f"({tokens / max(1, total):.2f} tokens/iteration)</h3>")
        for number, block in enumerate(blocks):
            parts.append(f"<p>block {number}</p><table>")
            for j, row in enumerate(block.states):
                cells = "".join(
                    f"<td class='{'ok' if block.correct[j][i] else 'bad'}{' ff' if block.fast_forwarded[j][i] else ''}"
                    f"{' st' if block.stationary[j][i] else ''}'>{html.escape(token)}</td>"
                    for i, token in enumerate(row)
                )
                parts.append(f"<tr><td>y({j})</td>{cells}</tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    write_atomically(path, "\n".join(parts))


def render_png(views: dict[str, list[BlockView]], path: Path) -> None:
    """The first block of each model as a coloured grid (rows: states, columns: positions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, len(views), figsize=(7 * len(views), 5), squeeze=False)
    for axis, (name, blocks) in zip(axes[0], views.items()):
        block = blocks[0]
        grid = np.array(block.correct, dtype=float)
        axis.imshow(grid, cmap=matplotlib.colors.ListedColormap(["#f4c4c4", "#c8f0c8"]), vmin=0, vmax=1, aspect="auto")
        for j, row in enumerate(block.states):
            for i, token in enumerate(row):
                weight = "bold" if block.fast_forwarded[j][i] else "normal"
                axis.text(i, j, token.strip()[:6], ha="center", va="center", fontsize=6, fontweight=weight,
                          color="#1a5fb4" if block.stationary[j][i] else "black")
        axis.set(title=f"{name}: {len(block.states) - 1} iterations for {len(block.states[0])} tokens",
                 xlabel="block position", ylabel="Jacobi state y(j)")
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)
