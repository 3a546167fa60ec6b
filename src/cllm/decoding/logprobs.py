"""The target's log-probabilities of the tokens a decoder emits (OpenAI's `logprobs`).

Every emitted token was chosen at a column of a forward of the target whose inputs were right
(that is why it was accepted), so the log-softmax of that column's logits is the target's own
distribution after the true prefix, whichever decoder ran: no extra forward. The batch scores
its target forwards for the rows that asked (`score`) and each decoder says at which column of
that forward each emitted token was chosen (`Batch.emit(..., source=)`). The distribution is the
model's raw one (temperature 1, no top-k/top-p), as vLLM reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    """One emitted token: its log-probability and the `top` most likely tokens (id, logprob) there."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Scores:
    """The log-probabilities at each column of one target forward, for the batch positions that asked."""

    positions: dict[int, int]  # batch position -> row of the tensors below
    chosen: torch.Tensor  # (R, m) of the token picked at each column
    top_ids: torch.Tensor  # (R, m, K)
    top_logprobs: torch.Tensor  # (R, m, K)
    wanted: list[int]  # (R,) how many top tokens each row asked for (<= K)

    def entries(self, position: int, tokens: list[int], columns: list[int]) -> list[TokenLogprob] | None:
        """The emitted `tokens` of the row at batch `position`, chosen at `columns`; None if it did not ask."""
        row = self.positions.get(position)
        if row is None:
            return None
        k = self.wanted[row]
        chosen = self.chosen[row, columns].tolist()
        ids, values = self.top_ids[row, columns, :k].tolist(), self.top_logprobs[row, columns, :k].tolist()
        return [TokenLogprob(token, logprob, tuple(zip(top, top_values)))
                for token, logprob, top, top_values in zip(tokens, chosen, ids, values)]


def score(logits: torch.Tensor, picked: torch.Tensor, wanted: list[int | None]) -> Scores | None:
    """Scores of `logits` (B, m, V) at the tokens `picked` (B, m) for the rows whose `wanted`
    (top-k count, 0: the chosen token only) is not None; None when no row asked."""
    asking = [i for i, k in enumerate(wanted) if k is not None]
    if not asking:
        return None
    which = torch.tensor(asking, device=logits.device)
    chosen_logits = logits[which]
    if chosen_logits.dtype != torch.float64:  # half precisions: the softmax in float32
        chosen_logits = chosen_logits.float()
    logprobs = chosen_logits.log_softmax(dim=-1)  # (R, m, V)
    chosen = logprobs.gather(-1, picked[which][..., None]).squeeze(-1)
    top = max(wanted[i] for i in asking)
    top_logprobs, top_ids = logprobs.topk(top, dim=-1)  # k = 0 gives (R, m, 0)
    return Scores({p: r for r, p in enumerate(asking)}, chosen.cpu(), top_ids.cpu(), top_logprobs.cpu(),
                  [wanted[i] for i in asking])


def prompt_logprobs(model, prompt_ids: list[int], top: int) -> list[TokenLogprob | None]:
    """The target's log-probability of each prompt token after the ones before it (None for the
    first, which has no context), with the `top` most likely tokens there: one forward."""
    input_ids = torch.tensor([prompt_ids], device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=input_ids).logits[:, :-1]  # (1, P-1, V): column j predicts token j + 1
    scores = score(logits, input_ids[:, 1:], [top])
    rest = scores.entries(0, prompt_ids[1:], list(range(len(prompt_ids) - 1))) if scores is not None else []
    return [None, *rest]
