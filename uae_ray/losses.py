"""Losses: pure functions of tensors (no models, no I/O, no process groups).

Two families:

- reward model (cross-encoder) fit on generator utilities: :func:`reward_listwise_loss` = listwise KL between the
  softmax of per-query standardised utilities (temperature ``tau``) and the softmax of the model's scores, plus a
  Huber term on the standardised utility (utilities are noisy);
- student bi-encoder: :func:`utility_modulated_infonce` (soft teacher targets + in-batch negatives),
  :func:`infonce` (gold only: the ablation), :func:`utility_kl` (the KL form over the group only),
  :func:`plackett_luce_distillation` (listwise: the teacher's ranking, positives first, over the group only).

In-batch negatives from other workers are passed in already gathered (see :func:`uae_ray.distributed.gather_with_grad`)
so these functions stay pure: ``in_batch`` holds every passage of the global batch, flattened group by group, and
``in_batch_offset`` is the position of this worker's first passage in it.

References:
    - van den Oord et al., 2018, "Representation Learning with Contrastive Predictive Coding" (InfoNCE).
    - Hinton et al., 2015, "Distilling the Knowledge in a Neural Network" (soft targets, temperatures).
    - Izacard & Grave, 2021, "Distilling Knowledge from Reader to Retriever" (KL to a reader-derived distribution).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------------- helpers
def _neg_large(x: Tensor) -> float:
    """A finite stand-in for -inf (so 0 * log p stays 0 where a column is masked out)."""
    return torch.finfo(x.dtype).min / 2


def masked_log_softmax(logits: Tensor, mask: Tensor | None, dim: int = -1) -> Tensor:
    """``log_softmax`` over ``dim`` ignoring entries where ``mask`` is False (their output is very negative, finite).

    Args:
        logits: [..., N] scores.
        mask: [..., N] bool (True = valid) or None.
    """
    if mask is not None:
        logits = logits.masked_fill(~mask, _neg_large(logits))
    return F.log_softmax(logits, dim=dim)


def standardize_per_query(values: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """Z-score each row over its valid entries; masked entries become 0. A constant row becomes all 0.

    Args:
        values: [B, G] raw values (e.g. utilities).
        mask: [B, G] bool, True where the entry is a real candidate.

    Returns:
        [B, G] standardised values.
    """
    m = mask.to(values.dtype)
    n = m.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (values * m).sum(-1, keepdim=True) / n
    var = (((values - mean) * m) ** 2).sum(-1, keepdim=True) / n
    z = (values - mean) / (var.sqrt() + eps)
    return z * m


def soft_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over rows of ``-sum_j targets[i,j] * log softmax(logits[i])_j``.

    Args:
        logits: [B, N] student scores (already divided by the temperature).
        targets: [B, N] probabilities (rows sum to 1; 0 on masked columns).
        mask: [B, N] bool or None; False columns are excluded from the softmax.

    Returns:
        Scalar tensor.
    """
    logp = masked_log_softmax(logits, mask)
    return -(targets * logp).sum(-1).mean()


# ------------------------------------------------------------------------------------------------------ reward model
def listwise_kl(scores: Tensor, target_logits: Tensor, mask: Tensor) -> Tensor:
    """KL(softmax(target_logits) || softmax(scores)) per query over valid candidates, averaged over queries.

    Args:
        scores: [B, G] model scores.
        target_logits: [B, G] target logits (e.g. standardised utility / tau).
        mask: [B, G] bool, True for real candidates.
    """
    logq = masked_log_softmax(scores, mask)
    logp = masked_log_softmax(target_logits, mask)
    p = logp.exp() * mask
    return (p * (logp - logq) * mask).sum(-1).mean()


def reward_listwise_loss(
    scores: Tensor, utilities: Tensor, mask: Tensor, *, tau: float = 1.0, huber_weight: float = 0.5,
    huber_delta: float = 1.0,
) -> Tensor:
    """Reward-model loss: listwise KL to softmax(z(u)/tau) plus ``huber_weight`` * Huber(scores, z(u)).

    ``z(u)`` standardises the utilities within each query, so the score scale is comparable across queries and the
    pointwise term anchors the scores (the KL alone is shift-invariant).

    Args:
        scores: [B, G] cross-encoder outputs.
        utilities: [B, G] generator utilities u(q, d).
        mask: [B, G] bool, True for real candidates (groups are padded to G).
        tau: temperature of the target distribution.
        huber_weight: weight of the pointwise Huber term (0 disables it).
        huber_delta: Huber transition point.

    Returns:
        Scalar tensor.
    """
    z = standardize_per_query(utilities, mask)
    kl = listwise_kl(scores, z / tau, mask)
    if huber_weight == 0:
        return kl
    m = mask.to(scores.dtype)
    hub = F.huber_loss(scores, z, reduction="none", delta=huber_delta)
    return kl + huber_weight * (hub * m).sum() / m.sum().clamp_min(1.0)


# ------------------------------------------------------------------------------------------------------- bi-encoder
def teacher_targets(
    teacher_scores: Tensor, gold_mask: Tensor, valid_mask: Tensor, *, tau_t: float, gold_mix: float
) -> Tensor:
    """Soft targets over each query's group: ``(1 - gold_mix) * softmax(r / tau_t) + gold_mix * gold``.

    ``gold`` is uniform over the gold passages of the group; a row without gold uses the teacher distribution alone.

    Args:
        teacher_scores: [B, G] reward-model scores r(q, d).
        gold_mask: [B, G] bool, True for gold passages.
        valid_mask: [B, G] bool, True for real (non-padding) passages.
        tau_t: teacher temperature.
        gold_mix: weight of the gold one-hot in [0, 1].

    Returns:
        [B, G] probabilities, rows sum to 1, 0 on padding.
    """
    soft = masked_log_softmax(teacher_scores / tau_t, valid_mask).exp() * valid_mask
    gold = (gold_mask & valid_mask).to(soft.dtype)
    n_gold = gold.sum(-1, keepdim=True)
    gold = torch.where(n_gold > 0, gold / n_gold.clamp_min(1.0), soft)
    return (1.0 - gold_mix) * soft + gold_mix * gold


def _student_logits(
    query: Tensor, passages: Tensor, valid_mask: Tensor, in_batch: Tensor | None, in_batch_valid: Tensor | None,
    in_batch_offset: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logits [B, N], mask [B, N], column index of each group entry [B, G]) before the temperature."""
    b, g, _ = passages.shape
    if in_batch is None:
        logits = torch.einsum("bd,bgd->bg", query, passages)
        cols = torch.arange(g, device=query.device).expand(b, g)
        return logits, valid_mask, cols
    if in_batch_valid is None:
        in_batch_valid = torch.ones(in_batch.shape[0], dtype=torch.bool, device=in_batch.device)
    logits = query @ in_batch.T
    mask = in_batch_valid.unsqueeze(0).expand(b, -1)
    cols = in_batch_offset + torch.arange(b * g, device=query.device).view(b, g)
    return logits, mask, cols


def _scatter_targets(group_targets: Tensor, cols: Tensor, n_cols: int) -> Tensor:
    out = group_targets.new_zeros(group_targets.shape[0], n_cols)
    return out.scatter(1, cols, group_targets)


def utility_modulated_infonce(
    query: Tensor,
    passages: Tensor,
    teacher_scores: Tensor,
    gold_mask: Tensor,
    valid_mask: Tensor,
    *,
    tau_s: float,
    tau_t: float,
    gold_mix: float,
    in_batch: Tensor | None = None,
    in_batch_valid: Tensor | None = None,
    in_batch_offset: int = 0,
) -> Tensor:
    """Utility-Modulated InfoNCE: cross-entropy of the student softmax against teacher soft targets.

    For query i the student distribution is ``softmax(<q_i, p_j> / tau_s)`` over its own group (gold + hard negatives)
    and, with ``in_batch``, over every passage of the global batch (other queries' groups, from all workers) whose
    teacher probability is 0. Targets: :func:`teacher_targets`. With ``gold_mix=1`` (or a one-hot teacher) this is
    exactly :func:`infonce`.

    Args:
        query: [B, d] query embeddings (unit vectors).
        passages: [B, G, d] each query's group of passage embeddings.
        teacher_scores: [B, G] teacher (reward model) scores.
        gold_mask: [B, G] bool, True for gold passages.
        valid_mask: [B, G] bool, False on padding.
        tau_s: student temperature.
        tau_t: teacher temperature.
        gold_mix: weight of the gold one-hot in the target.
        in_batch: [N, d] all passages of the global batch (``passages`` of every worker flattened and concatenated)
            or None for group-only negatives.
        in_batch_valid: [N] bool validity of ``in_batch`` rows.
        in_batch_offset: index in ``in_batch`` of this worker's ``passages[0, 0]``.

    Returns:
        Scalar tensor (mean over the B queries).
    """
    targets = teacher_targets(teacher_scores, gold_mask, valid_mask, tau_t=tau_t, gold_mix=gold_mix)
    logits, mask, cols = _student_logits(query, passages, valid_mask, in_batch, in_batch_valid, in_batch_offset)
    full = _scatter_targets(targets, cols, logits.shape[1])
    return soft_cross_entropy(logits / tau_s, full, mask)


def infonce(
    query: Tensor,
    passages: Tensor,
    gold_mask: Tensor,
    valid_mask: Tensor,
    *,
    tau_s: float,
    in_batch: Tensor | None = None,
    in_batch_valid: Tensor | None = None,
    in_batch_offset: int = 0,
) -> Tensor:
    """Plain supervised InfoNCE on gold passages (uniform over a query's golds), same negatives as UAE.

    Args: as :func:`utility_modulated_infonce`, without the teacher.

    Returns:
        Scalar tensor.
    """
    gold = (gold_mask & valid_mask).to(query.dtype)
    targets = gold / gold.sum(-1, keepdim=True).clamp_min(1.0)
    logits, mask, cols = _student_logits(query, passages, valid_mask, in_batch, in_batch_valid, in_batch_offset)
    full = _scatter_targets(targets, cols, logits.shape[1])
    return soft_cross_entropy(logits / tau_s, full, mask)


def utility_kl(
    query: Tensor,
    passages: Tensor,
    teacher_scores: Tensor,
    gold_mask: Tensor,
    valid_mask: Tensor,
    *,
    tau_s: float,
    tau_t: float,
    gold_mix: float,
) -> Tensor:
    """The KL form: KL(teacher targets || student softmax) over each query's own group (no in-batch negatives).

    Same gradient as the group-only cross-entropy (they differ by the teacher entropy, a constant), but the value is 0
    at a perfect match, which makes curves comparable across temperatures.

    Args: as :func:`utility_modulated_infonce` (no in-batch arguments).

    Returns:
        Scalar tensor.
    """
    targets = teacher_targets(teacher_scores, gold_mask, valid_mask, tau_t=tau_t, gold_mix=gold_mix)
    logits = torch.einsum("bd,bgd->bg", query, passages) / tau_s
    logq = masked_log_softmax(logits, valid_mask)
    logp = torch.log(targets.clamp_min(1e-30))
    return (targets * (logp - logq) * valid_mask).sum(-1).mean()


def plackett_luce_distillation(
    query: Tensor,
    passages: Tensor,
    teacher_scores: Tensor,
    gold_mask: Tensor,
    valid_mask: Tensor,
    *,
    tau_s: float,
) -> Tensor:
    """Listwise distillation (ListMLE): the negative Plackett-Luce log-likelihood, under the student's scores, of
    the teacher's ranking of each query's group, positives first.

    The target permutation puts the group's positives (``gold_mask``) first, each block ordered by teacher score;
    the likelihood of a permutation pi under scores s is ``prod_i exp(s_pi(i)) / sum_{j >= i} exp(s_pi(j))``. Unlike
    the softmax targets of :func:`utility_modulated_infonce`, every position of the ranking is supervised, not only
    the head of the teacher distribution. Group-only (no in-batch negatives: they have no place in the ranking).

    Args:
        query: [B, d] query embeddings (unit vectors).
        passages: [B, G, d] each query's group of passage embeddings.
        teacher_scores: [B, G] teacher scores (order within the positives and within the rest).
        gold_mask: [B, G] bool, True for positives (ranked first).
        valid_mask: [B, G] bool, False on padding (left out of the ranking).
        tau_s: student temperature.

    Returns:
        Scalar tensor: the mean over queries of the per-position mean negative log-likelihood.

    References:
        - Xia et al., 2008, "Listwise Approach to Learning to Rank: Theory and Algorithm" (ListMLE).
        - Plackett, 1975; Luce, 1959 (the Plackett-Luce model).
    """
    scores = torch.einsum("bd,bgd->bg", query, passages) / tau_s  # [B, G]
    t = teacher_scores.to(scores.dtype)
    span = (t.max(-1, keepdim=True).values - t.min(-1, keepdim=True).values).detach() + 1.0
    key = torch.where(gold_mask & valid_mask, t + span, t)  # positives above every other entry  [B, G]
    key = key.masked_fill(~valid_mask, float("-inf"))  # padding last
    order = torch.argsort(key, dim=-1, descending=True, stable=True)  # [B, G]
    s = scores.gather(-1, order)
    valid = valid_mask.gather(-1, order)
    s = s.masked_fill(~valid, _neg_large(s))
    # log sum_{j >= i} exp(s_j): a reversed log-cumsum-exp  [B, G]
    tail = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)
    nll = (tail - s) * valid
    return (nll.sum(-1) / valid.sum(-1).clamp_min(1)).mean()


# ------------------------------------------------------------------------------------------------ loss selection
class EncoderLoss(StrEnum):
    """The student objectives the ``train-encoder`` config's ``loss`` field names."""

    UAE = "uae"
    INFONCE = "infonce"
    KL = "kl"
    LISTWISE = "listwise"


@dataclass(frozen=True)
class GroupBatch:
    """One worker's encoded batch, as the encoder losses take it (shapes as in :func:`utility_modulated_infonce`)."""

    query: Tensor
    passages: Tensor
    teacher_scores: Tensor
    gold_mask: Tensor
    valid_mask: Tensor
    in_batch: Tensor | None = None
    in_batch_valid: Tensor | None = None
    in_batch_offset: int = 0


@dataclass(frozen=True)
class EncoderLossParams:
    tau_s: float
    tau_t: float
    gold_mix: float


def _uae(b: GroupBatch, p: EncoderLossParams) -> Tensor:
    return utility_modulated_infonce(
        b.query, b.passages, b.teacher_scores, b.gold_mask, b.valid_mask, tau_s=p.tau_s, tau_t=p.tau_t,
        gold_mix=p.gold_mix, in_batch=b.in_batch, in_batch_valid=b.in_batch_valid, in_batch_offset=b.in_batch_offset,
    )


def _infonce(b: GroupBatch, p: EncoderLossParams) -> Tensor:
    return infonce(
        b.query, b.passages, b.gold_mask, b.valid_mask, tau_s=p.tau_s, in_batch=b.in_batch,
        in_batch_valid=b.in_batch_valid, in_batch_offset=b.in_batch_offset,
    )


def _kl(b: GroupBatch, p: EncoderLossParams) -> Tensor:
    return utility_kl(
        b.query, b.passages, b.teacher_scores, b.gold_mask, b.valid_mask, tau_s=p.tau_s, tau_t=p.tau_t,
        gold_mix=p.gold_mix,
    )


def _listwise(b: GroupBatch, p: EncoderLossParams) -> Tensor:
    return plackett_luce_distillation(b.query, b.passages, b.teacher_scores, b.gold_mask, b.valid_mask, tau_s=p.tau_s)


ENCODER_LOSSES: dict[EncoderLoss, Callable[[GroupBatch, EncoderLossParams], Tensor]] = {
    EncoderLoss.UAE: _uae,
    EncoderLoss.INFONCE: _infonce,
    EncoderLoss.KL: _kl,
    EncoderLoss.LISTWISE: _listwise,
}
#: Which objectives use gathered in-batch negatives (the KL and listwise forms are group-only by definition).
USES_IN_BATCH: dict[EncoderLoss, bool] = {
    EncoderLoss.UAE: True, EncoderLoss.INFONCE: True, EncoderLoss.KL: False, EncoderLoss.LISTWISE: False,
}
