"""Losses on hand-made logits: zero when equal, masks, closed forms, gradients only into q_theta."""

import math

import pytest
import torch

from cllm.losses import (
    after_eos_mask,
    ar_loss,
    consistency_loss,
    distillation_loss,
    from_first_difference_mask,
    token_distance,
)


def two_token_logits(p: float) -> torch.Tensor:
    """Logits of the distribution (p, 1 - p) over a 2-token vocabulary."""
    return torch.tensor([math.log(p), math.log(1 - p)])


@pytest.mark.parametrize("distance", ["forward_kl", "reverse_kl", "jsd"])
def test_identical_distributions_give_zero(distance):
    logits = torch.randn(3, 5, 11)
    loss = consistency_loss(logits.clone().requires_grad_(), logits, torch.ones(3, 5, dtype=torch.bool), distance)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_closed_forms_on_two_tokens():
    p, q = two_token_logits(0.8), two_token_logits(0.4)
    kl_pq = 0.8 * math.log(0.8 / 0.4) + 0.2 * math.log(0.2 / 0.6)
    kl_qp = 0.4 * math.log(0.4 / 0.8) + 0.6 * math.log(0.6 / 0.2)
    assert token_distance(p, q, "forward_kl").item() == pytest.approx(kl_pq, rel=1e-5)
    assert token_distance(p, q, "reverse_kl").item() == pytest.approx(kl_qp, rel=1e-5)
    m = [0.5 * 0.8 + 0.5 * 0.4, 0.5 * 0.2 + 0.5 * 0.6]
    jsd = 0.5 * (0.8 * math.log(0.8 / m[0]) + 0.2 * math.log(0.2 / m[1])) + \
        0.5 * (0.4 * math.log(0.4 / m[0]) + 0.6 * math.log(0.6 / m[1]))
    assert token_distance(p, q, "jsd", beta=0.5).item() == pytest.approx(jsd, rel=1e-5)
    assert token_distance(p, q, "argmax_ce").item() == pytest.approx(-math.log(0.4), rel=1e-5)
    with pytest.raises(ValueError):
        token_distance(p, q, "jsd", beta=1.0)
    with pytest.raises(ValueError):
        token_distance(p, q, "l2")


def test_argmax_ce_depends_on_the_target_only_through_its_top_token():
    student = torch.tensor([[0.3, -1.0, 2.0]])
    confident, hesitant = torch.tensor([[9.0, 0.0, 0.0]]), torch.tensor([[0.2, 0.1, 0.15]])
    expected = -torch.log_softmax(student, -1)[0, 0]
    assert token_distance(confident, student, "argmax_ce").item() == pytest.approx(expected.item(), rel=1e-6)
    assert token_distance(hesitant, student, "argmax_ce").item() == pytest.approx(expected.item(), rel=1e-6)


def test_masking_and_normalisation():
    target = torch.stack([two_token_logits(0.8), two_token_logits(0.8), two_token_logits(0.5)])[None]  # (1, 3, 2)
    student = torch.stack([two_token_logits(0.4), two_token_logits(0.8), two_token_logits(0.1)])[None]
    mask = torch.tensor([[True, True, False]])
    kl = 0.8 * math.log(0.8 / 0.4) + 0.2 * math.log(0.2 / 0.6)
    assert consistency_loss(student, target, mask).item() == pytest.approx(kl / 2, rel=1e-5)
    # A global count (gradient accumulation) replaces the local one.
    assert consistency_loss(student, target, mask, num_items=8).item() == pytest.approx(kl / 8, rel=1e-5)
    assert consistency_loss(student, target, torch.zeros_like(mask)).item() == 0.0


def test_gradient_flows_only_into_the_student():
    target = torch.randn(2, 4, 7, requires_grad=True)
    student = torch.randn(2, 4, 7, requires_grad=True)
    consistency_loss(student, target, torch.ones(2, 4, dtype=torch.bool)).backward()
    assert target.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_ar_loss_ignores_masked_labels_and_smooths():
    logits = torch.stack([two_token_logits(0.9), two_token_logits(0.3), two_token_logits(0.5)])[None]
    labels = torch.tensor([[0, -100, 1]])
    expected = -(math.log(0.9) + math.log(0.5)) / 2
    assert ar_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    smoothed = ar_loss(logits, labels, label_smoothing=0.2).item()
    # torch smoothing: target = (1 - eps) one-hot + eps / V uniform, eps = 0.2, V = 2
    manual = sum(-(0.8 * lp[t] + 0.1 * lp.sum()) for lp, t in
                 [(torch.log(torch.tensor([0.9, 0.1])), 0), (torch.log(torch.tensor([0.5, 0.5])), 1)]) / 2
    assert smoothed == pytest.approx(float(manual), rel=1e-5)
    assert ar_loss(logits, labels, num_items=4).item() == pytest.approx(expected / 2, rel=1e-5)


def test_masks():
    tokens = torch.tensor([[5, 2, 7, 2], [1, 1, 1, 1]])
    assert after_eos_mask(tokens, [2]).tolist() == [[True, True, False, False], [True, True, True, True]]
    state = torch.tensor([[1, 2, 9, 4], [1, 2, 3, 4]])
    fixed = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    assert from_first_difference_mask(state, fixed).tolist() == [[False, False, True, True], [False] * 4]


def test_distillation_loss_is_the_mean_kl_from_teacher_to_student_over_the_counted_positions():
    teacher = torch.stack([two_token_logits(0.9), two_token_logits(0.5), two_token_logits(0.2)])[None]  # (1, 3, 2)
    student = torch.stack([two_token_logits(0.6), two_token_logits(0.5), two_token_logits(0.99)])[None].requires_grad_()
    kl = lambda p, q: p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))  # noqa: E731
    mask = torch.tensor([[True, True, False]])  # the third position (say, the prompt) does not count
    loss = distillation_loss(student, teacher, mask)
    assert loss.item() == pytest.approx((kl(0.9, 0.6) + 0.0) / 2, rel=1e-5)
    assert distillation_loss(student, teacher, mask, num_items=4).item() == pytest.approx(kl(0.9, 0.6) / 4, rel=1e-5)
    loss.backward()
    assert student.grad[0, 2].abs().max() == 0 and student.grad[0, 0].abs().max() > 0
    # the whole distribution counts, not only the top token: same argmax, different loss
    assert (
        distillation_loss(two_token_logits(0.7)[None, None], teacher[:, :1], torch.ones(1, 1, dtype=torch.bool)).item()
        > 0
    )
    assert distillation_loss(teacher, teacher, torch.ones(1, 3, dtype=torch.bool)).item() == pytest.approx(
        0.0, abs=1e-7
    )
