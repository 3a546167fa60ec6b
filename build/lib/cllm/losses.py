"""Consistency and AR losses as pure functions of logits, detached targets and masks.

Shapes: B batch, L positions, V vocabulary. `student_logits` come from q_theta and carry the
gradient; `target_logits` are the stop-gradient targets (detached here as well, so a caller
cannot leak a gradient into the target). Every loss returns the SUM of its per-position values
divided by `num_items`: pass the number of counted positions of the whole optimizer step (all
micro-batches of a gradient-accumulation window, all processes) to get the exact mean over that
step; leave it None to divide by this batch's own count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cllm.train_config import DISTANCES


def token_distance(
    target_logits: torch.Tensor, student_logits: torch.Tensor, distance: str = "forward_kl", beta: float = 0.5
) -> torch.Tensor:
    """Per-position divergence D(p || q) between p = softmax(target) and q = softmax(student): (..., V) -> (...).

    forward_kl: KL(p || q) = sum p (log p - log q)  (the paper's default; mode-covering)
    reverse_kl: KL(q || p)                          (mode-seeking)
    jsd:        generalized Jensen-Shannon, beta * KL(p || m) + (1 - beta) * KL(q || m) with
                m = beta * p + (1 - beta) * q; beta = 0.5 is the symmetric JSD. Both terms
                vanish as beta reaches 0 or 1, so beta must lie strictly between them.
    argmax_ce:  -log q(argmax p), forward KL to the one-hot of p's top token: Jacobi decoding only
                needs q's argmax to be the fixed point's token, not p's whole distribution, which
                a wrong prefix often cannot determine. Not in the paper: cllm's own option.
    """
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    if distance == "argmax_ce":
        return -log_q.gather(-1, target_logits.detach().argmax(-1, keepdim=True)).squeeze(-1)
    log_p = F.log_softmax(target_logits.detach().float(), dim=-1)
    if distance == "forward_kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if distance == "reverse_kl":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
    log_m = torch.logsumexp(torch.stack([log_p + torch.log(torch.tensor(beta)),
                                         log_q + torch.log(torch.tensor(1 - beta))]), dim=0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return beta * kl_pm + (1 - beta) * kl_qm


def _normalise(total: torch.Tensor, mask: torch.Tensor, num_items: int | torch.Tensor | None) -> torch.Tensor:
    count = mask.sum() if num_items is None else num_items
    return total / torch.as_tensor(count, dtype=total.dtype, device=total.device).clamp(min=1)


def consistency_loss(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor,
    mask: torch.Tensor,
    distance: str = "forward_kl",
    beta: float = 0.5,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_i D(q_stopgrad(.|y*_<i, x) || q_theta(.|y_<i, x)) over counted block positions.

    Global consistency (GC): student logits from a trajectory state y, target logits from its
    fixed point y*. Local consistency (LC): the same with the adjacent states y(j) and y(j+1).
    student_logits, target_logits: (B, L, V); mask: (B, L), True where a position counts.
    """
    per_position = token_distance(target_logits, student_logits, distance, beta)  # (B, L)
    mask = mask.to(per_position.dtype)
    return _normalise((per_position * mask).sum(), mask, num_items)


def ar_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    num_items: int | torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """-sum log q_theta(l_i | l_<i, x) over labelled positions (prompt and padding set to `ignore_index`).

    logits: (B, T, V) already aligned with labels: logits[:, t] predicts labels[:, t].
    """
    per_position = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index,
        label_smoothing=label_smoothing, reduction="none",
    )
    mask = labels.flatten() != ignore_index
    return _normalise(per_position.sum(), mask, num_items)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_t KL(p_teacher(.|l_<t, x) || q_theta(.|l_<t, x)) over the counted positions of the
    teacher's own output l: the whole next-token distribution, not only its top token, so the
    student keeps the teacher's ranking of the alternatives as well as its greedy choice.

    student_logits, teacher_logits: (B, T, V) aligned position by position; mask: (B, T).
    """
    return consistency_loss(student_logits, teacher_logits, mask, "forward_kl", num_items=num_items)


def after_eos_mask(tokens: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """(B, L) True up to and including each row's first EOS, False after it."""
    is_eos = torch.isin(tokens, torch.tensor(list(eos_token_ids), device=tokens.device, dtype=tokens.dtype))
    seen_before = is_eos.long().cumsum(1) - is_eos.long()
    return seen_before == 0


def from_first_difference_mask(state: torch.Tensor, fixed_point: torch.Tensor) -> torch.Tensor:
    """(B, L) True from the first position where `state` differs from `fixed_point` on (the original
    code's option: positions before it are already right and need no consistency signal)."""
    differs = state != fixed_point
    return differs.long().cumsum(1) > 0
