"""Float64 reference of the original ("seed") project's loss formulas, used as a test oracle.

This module is an independent, deliberately unoptimised transcription of the loss definitions of the
original project (N-ITC with its soft labels and multi-view quirk, SimCLR, C-ITC, the pooled in-modal and
cross-modal Circle losses, NC-ITC, and the strategy table; docs/seed_differences.md). It was written from a
functional description of that project only, not from the implementation under test, so that tests can
compare the implementation against values computed by a second, readable derivation.

Conventions:

* ``P[i, j] = [pid_i == pid_j]``; sigmoid targets ``z = 2P - 1``.
* N-ITC logits ``l[i, j] = s * <t_i, v_j> + b`` (text rows, image columns); the loss is
  ``-(1/B) * sum_ij log sigmoid(z_ij * l_ij)``.
* Every function works in float64 and returns a Python ``float``. Feature inputs are L2-normalised
  inside each function where the seed normalises them (normalising an already normalised input is a
  no-op up to rounding).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "seed_citc",
    "seed_cross_modal_circle",
    "seed_in_modal_circle",
    "seed_intrinsic",
    "seed_nitc_sigmoid",
    "seed_nitc_sigmoid_soft",
    "seed_simclr",
    "seed_strategy_total",
]

STRATEGIES = ("baseline", "auxiliary", "intrinsic", "circle_only", "auxiliary_cross")


def _f64(x: torch.Tensor) -> torch.Tensor:
    """Return a detached float64 copy of ``x``."""
    return torch.as_tensor(x).detach().to(torch.float64).clone()


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the rows of ``x`` in float64."""
    x = _f64(x)
    return x / x.norm(dim=1, keepdim=True)


def _pids(pids) -> list[int]:
    """Return the person ids as a list of Python ints."""
    return [int(p) for p in torch.as_tensor(pids).reshape(-1).tolist()]


def _log_sigmoid(x: float) -> float:
    """Numerically stable ``log(sigmoid(x))`` for a Python float."""
    if x >= 0:
        return -math.log1p(math.exp(-x))
    return x - math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    """Logistic function for a Python float."""
    return math.exp(_log_sigmoid(x))


def _softplus(x: float) -> float:
    """Numerically stable ``log(1 + exp(x))``."""
    return -_log_sigmoid(-x)


def _logsumexp(values: list[float]) -> float:
    """Numerically stable log-sum-exp of a non-empty list of floats."""
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _bce_with_logits(logit: float, target: float) -> float:
    """Binary cross-entropy with logits for one entry: ``-(y log s(x) + (1-y) log(1-s(x)))``."""
    return -(target * _log_sigmoid(logit) + (1.0 - target) * _log_sigmoid(-logit))


# ---------------------------------------------------------------------------------------------------
# N-ITC (sigmoid mode)
# ---------------------------------------------------------------------------------------------------


def _nitc_sigmoid_with_targets(
    text: torch.Tensor, image: torch.Tensor, z: list[list[float]], scale: float, bias: float
) -> float:
    """Sigmoid N-ITC ``-(1/B) sum_ij log sigmoid(z_ij * (s <t_i, v_j> + b))`` for given multipliers ``z``."""
    text, image = _f64(text), _f64(image)
    batch = text.shape[0]
    total = 0.0
    for i in range(batch):
        for j in range(batch):
            logit = float(scale) * float(torch.dot(text[i], image[j])) + float(bias)
            total += -_log_sigmoid(z[i][j] * logit)
    return total / batch


def seed_nitc_sigmoid(text: torch.Tensor, image: torch.Tensor, pids, scale: float, bias: float) -> float:
    """Seed sigmoid N-ITC with hard labels, alpha = 0.

    Args:
        text: (B, D) L2-normalised text features.
        image: (B, D) L2-normalised image features.
        pids: (B,) person ids.
        scale: ``s = min(exp(logit_scale), 100)``.
        bias: the logit bias ``b``.

    Returns:
        ``-(1/B) sum_ij log sigmoid(z_ij l_ij)`` with ``z = 2P - 1`` and ``l = s * T V^T + b``.
    """
    ids = _pids(pids)
    z = [[1.0 if pi == pj else -1.0 for pj in ids] for pi in ids]
    return _nitc_sigmoid_with_targets(text, image, z, scale, bias)


def seed_nitc_sigmoid_soft(
    text: torch.Tensor,
    image: torch.Tensor,
    teacher_text: torch.Tensor,
    teacher_image: torch.Tensor,
    pids,
    scale: float,
    bias: float,
    alpha: float,
) -> float:
    """Seed sigmoid N-ITC with the seed's soft-label mixing.

    The teacher logits are ``s * tt_i . ti_j + b`` from the (normalised, gradient-free) teacher features,
    and the sign multiplier becomes ``z <- alpha * sigmoid(teacher) + (1 - alpha) * (2P - 1)``.

    Args:
        text: (B, D) L2-normalised text features.
        image: (B, D) L2-normalised image features.
        teacher_text: (B, D) text features of the soft-label source (normalised here).
        teacher_image: (B, D) image features of the soft-label source (normalised here).
        pids: (B,) person ids.
        scale: ``s`` (already capped at 100).
        bias: the logit bias ``b``.
        alpha: soft-label ratio.

    Returns:
        ``-(1/B) sum_ij log sigmoid(z_ij l_ij)`` with the mixed ``z``.
    """
    ids = _pids(pids)
    tt, ti = _normalise(teacher_text), _normalise(teacher_image)
    batch = len(ids)
    z = []
    for i in range(batch):
        row = []
        for j in range(batch):
            hard = 1.0 if ids[i] == ids[j] else -1.0
            teacher = _sigmoid(float(scale) * float(torch.dot(tt[i], ti[j])) + float(bias))
            row.append(alpha * teacher + (1.0 - alpha) * hard)
        z.append(row)
    return _nitc_sigmoid_with_targets(text, image, z, scale, bias)


# ---------------------------------------------------------------------------------------------------
# Circle losses (pooled "global pairwise" form)
# ---------------------------------------------------------------------------------------------------


def _pooled_circle(
    sim: torch.Tensor, positive: list[list[bool]], negative: list[list[bool]], margin: float, gamma: float
) -> float:
    """Pooled circle loss ``softplus(LSE_P[-g a_p (s_p - (1-m))] + LSE_N[g a_n (s_n - m)])``; 0 if P or N empty."""
    pos_logits, neg_logits = [], []
    rows, cols = sim.shape
    for i in range(rows):
        for j in range(cols):
            s = float(sim[i, j])
            if positive[i][j]:
                alpha_p = max(1.0 + margin - s, 0.0)
                pos_logits.append(-gamma * alpha_p * (s - (1.0 - margin)))
            elif negative[i][j]:
                alpha_n = max(s + margin, 0.0)
                neg_logits.append(gamma * alpha_n * (s - margin))
    if not pos_logits or not neg_logits:
        return 0.0
    return _softplus(_logsumexp(pos_logits) + _logsumexp(neg_logits))


def seed_in_modal_circle(feats: torch.Tensor, pids, margin: float, gamma: float) -> float:
    """Seed in-modal circle loss over one modality.

    Positives are ordered pairs ``i != j`` with equal pids, negatives ordered pairs with different pids.

    Args:
        feats: (B, D) features (normalised here).
        pids: (B,) person ids.
        margin: circle margin ``m``.
        gamma: circle scale ``gamma``.

    Returns:
        The pooled circle loss, or 0.0 when the batch has no positive or no negative pair.
    """
    x = _normalise(feats)
    ids = _pids(pids)
    sim = x @ x.T
    batch = len(ids)
    positive = [[i != j and ids[i] == ids[j] for j in range(batch)] for i in range(batch)]
    negative = [[ids[i] != ids[j] for j in range(batch)] for i in range(batch)]
    return _pooled_circle(sim, positive, negative, margin, gamma)


def seed_cross_modal_circle(image: torch.Tensor, text: torch.Tensor, pids, margin: float, gamma: float) -> float:
    """Seed cross-modal circle loss.

    ``S = V T^T`` (image rows, text columns); positives are all same-pid pairs including the diagonal,
    negatives all other pairs.

    Args:
        image: (B, D) image features (normalised here).
        text: (B, D) text features (normalised here).
        pids: (B,) person ids.
        margin: circle margin ``m``.
        gamma: circle scale ``gamma``.

    Returns:
        The pooled circle loss, or 0.0 when there is no negative pair.
    """
    v, t = _normalise(image), _normalise(text)
    ids = _pids(pids)
    sim = v @ t.T
    batch = len(ids)
    positive = [[ids[i] == ids[j] for j in range(batch)] for i in range(batch)]
    negative = [[ids[i] != ids[j] for j in range(batch)] for i in range(batch)]
    return _pooled_circle(sim, positive, negative, margin, gamma)


# ---------------------------------------------------------------------------------------------------
# Intrinsic NC-ITC
# ---------------------------------------------------------------------------------------------------


def _intrinsic_one_direction(sim: torch.Tensor, ids: list[int], margin: float, gamma: float) -> float:
    """Mean (1/B^2) BCE-with-logits of the element-wise circle logits against ``P``."""
    batch = len(ids)
    total = 0.0
    for i in range(batch):
        for j in range(batch):
            s = float(sim[i, j])
            if ids[i] == ids[j]:
                logit = gamma * max(1.0 + margin - s, 0.0) * (s - (1.0 - margin))
                target = 1.0
            else:
                logit = gamma * max(s + margin, 0.0) * (s - margin)
                target = 0.0
            total += _bce_with_logits(logit, target)
    return total / (batch * batch)


def seed_intrinsic(image: torch.Tensor, text: torch.Tensor, pids, margin: float, gamma: float) -> float:
    """Seed intrinsic N-ITC ("NC-ITC").

    Args:
        image: (B, D) image features (normalised here).
        text: (B, D) text features (normalised here).
        pids: (B,) person ids.
        margin: circle margin ``m``.
        gamma: circle scale ``gamma``.

    Returns:
        ``(BCE(g_i2t, P) + BCE(g_t2i, P)) / 2`` with each BCE averaged over the B^2 entries.
    """
    v, t = _normalise(image), _normalise(text)
    ids = _pids(pids)
    i2t = _intrinsic_one_direction(v @ t.T, ids, margin, gamma)
    t2i = _intrinsic_one_direction(t @ v.T, ids, margin, gamma)
    return 0.5 * (i2t + t2i)


# ---------------------------------------------------------------------------------------------------
# SimCLR and C-ITC
# ---------------------------------------------------------------------------------------------------


def _nt_xent_one_side(anchor: torch.Tensor, other: torch.Tensor, tau: float) -> float:
    """Mean over anchors of ``-log softmax`` of the positive among ``[a.b_j / tau, a.a_k / tau (k != i)]``."""
    batch = anchor.shape[0]
    total = 0.0
    for i in range(batch):
        logits = [float(torch.dot(anchor[i], other[j])) / tau for j in range(batch)]
        logits += [float(torch.dot(anchor[i], anchor[k])) / tau for k in range(batch) if k != i]
        total += _logsumexp(logits) - logits[i]
    return total / batch


def seed_simclr(a: torch.Tensor, b: torch.Tensor, tau: float) -> float:
    """Seed SimCLR / NT-Xent loss.

    Args:
        a: (B, D) SimCLR head outputs of view 1 (normalised here).
        b: (B, D) SimCLR head outputs of view 2 (normalised here).
        tau: temperature.

    Returns:
        ``(CE_a + CE_b) / 2``; for anchor ``a_i`` the positive is ``b_i`` and the negatives are all other
        ``b_j`` and all ``a_j`` (``j != i``).
    """
    a, b = _normalise(a), _normalise(b)
    return 0.5 * (_nt_xent_one_side(a, b, tau) + _nt_xent_one_side(b, a, tau))


def seed_citc(
    image: torch.Tensor, text: torch.Tensor, scale: float, bias: float, inmodal_weight: float, intermodal_weight: float
) -> float:
    """Seed cyclic ITC.

    Args:
        image: (B, D) image features (normalised here).
        text: (B, D) text features (normalised here).
        scale: ``s`` (already capped).
        bias: the logit bias (cancels).
        inmodal_weight: ``lambda_1``.
        intermodal_weight: ``lambda_2``.

    Returns:
        ``l1 mean((S_ii - S_tt)^2) / s^2 + l2 mean((S_it - S_it^T)^2) / s^2``.
    """
    v, t = _normalise(image), _normalise(text)
    batch = v.shape[0]
    s, b = float(scale), float(bias)
    in_modal = 0.0
    inter_modal = 0.0
    for i in range(batch):
        for j in range(batch):
            s_ii = s * float(torch.dot(v[i], v[j])) + b
            s_tt = s * float(torch.dot(t[i], t[j])) + b
            s_it = s * float(torch.dot(v[i], t[j])) + b
            s_ti = s * float(torch.dot(v[j], t[i])) + b
            in_modal += (s_ii - s_tt) ** 2
            inter_modal += (s_it - s_ti) ** 2
    n = batch * batch
    return inmodal_weight * in_modal / n / s**2 + intermodal_weight * inter_modal / n / s**2


# ---------------------------------------------------------------------------------------------------
# Strategy -> total loss
# ---------------------------------------------------------------------------------------------------


def seed_strategy_total(
    strategy: str,
    image: torch.Tensor,
    aug_image: torch.Tensor,
    text: torch.Tensor,
    pids,
    scale: float,
    bias: float,
    *,
    nitc_w: float,
    cir_w: float,
    margin: float,
    gamma: float,
    mvs: bool,
    ss_a: torch.Tensor | None = None,
    ss_b: torch.Tensor | None = None,
    ss_w: float = 0.0,
    tau: float = 0.1,
    citc_w: float = 0.0,
    citc_in: float = 0.25,
    citc_inter: float = 0.25,
    alpha: float = 0.0,
) -> float:
    """Seed total training loss of one step for a strategy, with the seed's MVS quirk.

    N-ITC strategies (``baseline``, ``auxiliary``, ``auxiliary_cross``): with MVS the second N-ITC term
    scores the ORIGINAL image features again; only its soft-label teacher (``alpha > 0``) uses the
    augmented image, and the two terms are averaged. ``intrinsic`` and ``circle_only`` (and the
    cross-modal circle of ``auxiliary_cross``) average the original and the augmented-image terms when
    ``mvs``. The circle term is on for ``auxiliary`` (in-modal) and ``auxiliary_cross`` (cross-modal).
    SimCLR and C-ITC are added when their weights are positive.

    Args:
        strategy: one of ``baseline``, ``auxiliary``, ``intrinsic``, ``circle_only``, ``auxiliary_cross``.
        image: (B, D) image features.
        aug_image: (B, D) features of the second (augmented) image view.
        text: (B, D) text features.
        pids: (B,) person ids.
        scale: ``s`` (already capped).
        bias: the logit bias.
        nitc_w: weight of the main term (``nitc_loss_weight``).
        cir_w: weight of the circle term (``circle_loss_weight``).
        margin: circle margin.
        gamma: circle scale.
        mvs: multi-view supervision flag.
        ss_a: SimCLR head outputs of view 1 (needed when ``ss_w > 0``).
        ss_b: SimCLR head outputs of view 2 (needed when ``ss_w > 0``).
        ss_w: SimCLR weight.
        tau: SimCLR temperature.
        citc_w: C-ITC weight.
        citc_in: C-ITC in-modal weight.
        citc_inter: C-ITC inter-modal weight.
        alpha: sigmoid soft-label ratio.

    Returns:
        The weighted total loss.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    v, v_aug, t = _normalise(image), _normalise(aug_image), _normalise(text)

    def nitc() -> float:
        if alpha:
            first = seed_nitc_sigmoid_soft(t, v, t, v, pids, scale, bias, alpha)
            second = seed_nitc_sigmoid_soft(t, v, t, v_aug, pids, scale, bias, alpha)
        else:
            first = second = seed_nitc_sigmoid(t, v, pids, scale, bias)
        return 0.5 * (first + second) if mvs else first

    def with_mvs(loss_fn) -> float:
        first = loss_fn(v, t, pids, margin, gamma)
        if not mvs:
            return first
        return 0.5 * (first + loss_fn(v_aug, t, pids, margin, gamma))

    total = 0.0
    if strategy in ("baseline", "auxiliary", "auxiliary_cross"):
        total += nitc_w * nitc()
    if strategy == "auxiliary":
        circle_image = seed_in_modal_circle(v, pids, margin, gamma)
        circle_text = seed_in_modal_circle(t, pids, margin, gamma)
        total += cir_w * 0.5 * (circle_image + circle_text)
    if strategy == "auxiliary_cross":
        total += cir_w * with_mvs(seed_cross_modal_circle)
    if strategy == "intrinsic":
        total += nitc_w * with_mvs(seed_intrinsic)
    if strategy == "circle_only":
        total += nitc_w * with_mvs(seed_cross_modal_circle)
    if ss_w > 0:
        if ss_a is None or ss_b is None:
            raise ValueError("ss_a and ss_b are required when ss_w > 0")
        total += ss_w * seed_simclr(ss_a, ss_b, tau)
    if citc_w > 0:
        total += citc_w * seed_citc(v, t, scale, bias, citc_in, citc_inter)
    return total
