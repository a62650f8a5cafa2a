"""Losses against hand-computed values, and their equivalences (one-hot teacher == InfoNCE, masking, KL form)."""

from __future__ import annotations

import math
import typing

import pytest
import torch
import torch.nn.functional as F

from uae_ray.config import TrainEncoderConfig
from uae_ray.losses import (
    ENCODER_LOSSES,
    EncoderLoss,
    EncoderLossParams,
    GroupBatch,
    infonce,
    listwise_kl,
    plackett_luce_distillation,
    reward_listwise_loss,
    soft_cross_entropy,
    standardize_per_query,
    teacher_targets,
    utility_kl,
    utility_modulated_infonce,
)

T = torch.tensor


def test_soft_cross_entropy_hand_value():
    # softmax([0, ln 3]) = [1/4, 3/4]; target on column 0 -> -log(1/4) = ln 4
    loss = soft_cross_entropy(T([[0.0, math.log(3.0)]]), T([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(math.log(4.0), abs=1e-6)


def test_standardize_per_query_hand_value_and_mask():
    z = standardize_per_query(T([[1.0, 2.0, 3.0, 100.0]]), T([[True, True, True, False]]))
    s = math.sqrt(2.0 / 3.0)
    assert z[0].tolist() == pytest.approx([-1 / s, 0.0, 1 / s, 0.0], abs=1e-4)
    # a constant row gives zeros, never NaN
    assert standardize_per_query(T([[5.0, 5.0]]), T([[True, True]])).tolist() == [[0.0, 0.0]]


def test_listwise_kl_hand_value():
    # target softmax([ln 3, 0]) = [.75, .25], model softmax([0, 0]) = [.5, .5]
    kl = listwise_kl(T([[0.0, 0.0]]), T([[math.log(3.0), 0.0]]), T([[True, True]]))
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl.item() == pytest.approx(expected, abs=1e-6)
    assert listwise_kl(T([[1.0, 2.0]]), T([[1.0, 2.0]]), T([[True, True]])).item() == pytest.approx(0.0, abs=1e-6)


def test_reward_listwise_loss_hand_value_and_padding():
    # utilities [1, 3] -> z = [-1, 1]; scores 0 -> KL(softmax([-1, 1]) || uniform) + w * mean(huber(0, +-1) = 0.5)
    p1 = 1 / (1 + math.exp(2.0))
    p = [p1, 1 - p1]
    kl = sum(pi * math.log(pi / 0.5) for pi in p)
    loss = reward_listwise_loss(T([[0.0, 0.0]]), T([[1.0, 3.0]]), T([[True, True]]), tau=1.0, huber_weight=0.5)
    assert loss.item() == pytest.approx(kl + 0.5 * 0.5, abs=1e-4)
    # a padded third candidate (mask False) with garbage values changes nothing
    padded = reward_listwise_loss(
        T([[0.0, 0.0, 9.0]]), T([[1.0, 3.0, -50.0]]), T([[True, True, False]]), tau=1.0, huber_weight=0.5
    )
    assert padded.item() == pytest.approx(loss.item(), abs=1e-6)


def test_teacher_targets_hand_value():
    t = teacher_targets(
        T([[0.0, math.log(3.0)]]), T([[True, False]]), T([[True, True]]), tau_t=1.0, gold_mix=0.5
    )
    assert t[0].tolist() == pytest.approx([0.625, 0.375], abs=1e-6)
    # no gold in the row: the teacher distribution alone
    t2 = teacher_targets(T([[0.0, math.log(3.0)]]), T([[False, False]]), T([[True, True]]), tau_t=1.0, gold_mix=0.5)
    assert t2[0].tolist() == pytest.approx([0.25, 0.75], abs=1e-6)


def test_utility_modulated_infonce_hand_value():
    q = T([[1.0, 0.0]])
    p = T([[[1.0, 0.0], [0.0, 1.0]]])  # logits [1, 0]
    loss = utility_modulated_infonce(
        q, p, T([[0.0, math.log(3.0)]]), T([[True, False]]), T([[True, True]]), tau_s=1.0, tau_t=1.0, gold_mix=0.5
    )
    lse = math.log(math.e + 1.0)
    expected = -(0.625 * (1.0 - lse) + 0.375 * (0.0 - lse))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def _random_batch(b: int = 3, g: int = 4, d: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=gen), dim=-1)
    p = F.normalize(torch.randn(b, g, d, generator=gen), dim=-1)
    r = torch.randn(b, g, generator=gen)
    gold = torch.zeros(b, g, dtype=torch.bool)
    gold[:, 0] = True
    valid = torch.ones(b, g, dtype=torch.bool)
    return q, p, r, gold, valid


def test_one_hot_teacher_equals_infonce():
    q, p, r, gold, valid = _random_batch()
    ib = p.reshape(-1, p.shape[-1])
    plain = infonce(q, p, gold, valid, tau_s=0.05, in_batch=ib)
    # gold_mix = 1: the target is the gold one-hot
    mixed = utility_modulated_infonce(q, p, r, gold, valid, tau_s=0.05, tau_t=1.0, gold_mix=1.0, in_batch=ib)
    assert mixed.item() == pytest.approx(plain.item(), rel=1e-6)
    # a teacher whose softmax is one-hot on the gold (huge margin), with no gold mixing
    one_hot_r = torch.where(gold, 0.0, -1e4)
    teach = utility_modulated_infonce(q, p, one_hot_r, gold, valid, tau_s=0.05, tau_t=1.0, gold_mix=0.0, in_batch=ib)
    assert teach.item() == pytest.approx(plain.item(), rel=1e-6)
    # and InfoNCE itself is the usual cross-entropy over [B, B*G] with label i*G
    logits = q @ ib.T / 0.05
    labels = torch.arange(q.shape[0]) * p.shape[1]
    assert plain.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_group_only_infonce_is_cross_entropy_over_group():
    q, p, _, gold, valid = _random_batch()
    loss = infonce(q, p, gold, valid, tau_s=0.1)
    logits = torch.einsum("bd,bgd->bg", q, p) / 0.1
    assert loss.item() == pytest.approx(F.cross_entropy(logits, torch.zeros(3, dtype=torch.long)).item(), rel=1e-6)


def test_padding_is_ignored_in_group_and_in_batch():
    q, p, r, gold, valid = _random_batch(b=2, g=3)
    base = utility_modulated_infonce(
        q, p, r, gold, valid, tau_s=0.1, tau_t=0.5, gold_mix=0.3, in_batch=p.reshape(-1, 8)
    )
    # add a 4th padded passage per group with a vector equal to the query (would dominate if not masked)
    pad = q.unsqueeze(1)
    p2 = torch.cat([p, pad], dim=1)
    r2 = torch.cat([r, torch.full((2, 1), 100.0)], dim=1)
    gold2 = torch.cat([gold, torch.zeros(2, 1, dtype=torch.bool)], dim=1)
    valid2 = torch.cat([valid, torch.zeros(2, 1, dtype=torch.bool)], dim=1)
    padded = utility_modulated_infonce(
        q, p2, r2, gold2, valid2, tau_s=0.1, tau_t=0.5, gold_mix=0.3, in_batch=p2.reshape(-1, 8),
        in_batch_valid=valid2.reshape(-1),
    )
    assert padded.item() == pytest.approx(base.item(), rel=1e-5)


def test_in_batch_offset_selects_own_group():
    # worker 1 of 2: its queries' groups sit after worker 0's passages in the gathered tensor
    q, p, _, gold, valid = _random_batch(b=2, g=3, seed=1)
    _, other, _, _, _ = _random_batch(b=2, g=3, seed=2)
    ib = torch.cat([other.reshape(-1, 8), p.reshape(-1, 8)])
    loss = infonce(q, p, gold, valid, tau_s=0.1, in_batch=ib, in_batch_offset=6)
    labels = 6 + torch.arange(2) * 3
    assert loss.item() == pytest.approx(F.cross_entropy(q @ ib.T / 0.1, labels).item(), rel=1e-6)


def test_kl_form_is_group_cross_entropy_minus_teacher_entropy():
    q, p, r, gold, valid = _random_batch()
    kl = utility_kl(q, p, r, gold, valid, tau_s=0.1, tau_t=0.7, gold_mix=0.2)
    ce = utility_modulated_infonce(q, p, r, gold, valid, tau_s=0.1, tau_t=0.7, gold_mix=0.2)
    t = teacher_targets(r, gold, valid, tau_t=0.7, gold_mix=0.2)
    entropy = -(t * t.log()).sum(-1).mean()
    assert kl.item() == pytest.approx((ce - entropy).item(), rel=1e-5)
    assert kl.item() >= 0


def test_every_config_loss_name_maps_to_a_function():
    names = typing.get_args(TrainEncoderConfig.model_fields["loss"].annotation)
    assert {EncoderLoss(n) for n in names} == set(ENCODER_LOSSES)
    q, p, r, gold, valid = _random_batch()
    batch = GroupBatch(q, p, r, gold, valid)
    params = EncoderLossParams(tau_s=0.1, tau_t=1.0, gold_mix=0.5)
    for fn in ENCODER_LOSSES.values():
        assert torch.isfinite(fn(batch, params))


def test_losses_have_gradients():
    q, p, r, gold, valid = _random_batch()
    q.requires_grad_(True)
    loss = utility_modulated_infonce(q, p, r, gold, valid, tau_s=0.05, tau_t=1.0, gold_mix=0.5)
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def _pl_brute_force(scores: list[float], order: list[int]) -> float:
    """-log P(order) under Plackett-Luce with ``scores``, by the definition, divided by the list length."""
    nll, rest = 0.0, list(order)
    for i in order:
        nll -= scores[i] - math.log(sum(math.exp(scores[j]) for j in rest))
        rest.remove(i)
    return nll / len(order)


def test_plackett_luce_matches_brute_force_positives_first_and_padding():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(2, 4), dim=-1)
    p = F.normalize(torch.randn(2, 4, 4), dim=-1)
    r = T([[0.1, 2.0, -1.0, 0.5], [3.0, 1.0, 2.0, 9.0]])
    gold = T([[False, False, True, False], [True, False, False, False]])
    valid = T([[True, True, True, True], [True, True, True, False]])  # row 1: the last entry is padding
    tau = 0.5
    s = (torch.einsum("bd,bgd->bg", q, p) / tau).tolist()
    # row 0: the positive (2) first, then by teacher: 1, 3, 0; row 1: positive 0, then 2, 1 (3 is padding)
    expected = (_pl_brute_force(s[0], [2, 1, 3, 0]) + _pl_brute_force(s[1][:3], [0, 2, 1])) / 2
    got = plackett_luce_distillation(q, p, r, gold, valid, tau_s=tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_plackett_luce_prefers_the_teacher_order():
    # two passages; the student that scores them in the teacher's order has the lower loss
    q = T([[1.0, 0.0]])
    good = T([[[1.0, 0.0], [0.0, 1.0]]])
    bad = T([[[0.0, 1.0], [1.0, 0.0]]])
    r, gold, valid = T([[2.0, 1.0]]), T([[False, False]]), T([[True, True]])
    lo = plackett_luce_distillation(q, good, r, gold, valid, tau_s=0.1)
    hi = plackett_luce_distillation(q, bad, r, gold, valid, tau_s=0.1)
    assert lo.item() < hi.item()
