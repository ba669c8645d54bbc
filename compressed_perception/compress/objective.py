"""How far a student's raw outputs are from the teacher's: one measure for every stage.

Pruning ranks groups by it, distillation minimises it, and both therefore aim at the same
thing: the teacher's class probabilities where the teacher sees something (and where the
student thinks it does), and the teacher's box-side distributions weighted by how sure
the teacher is that the cell holds an object. Each term is zero exactly when the student
reproduces the teacher, so an identical student has nothing to learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compressed_perception.models.nanodet import flatten_levels

Levels = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Weights:
    """The defaults are distillation's defaults, so the scan prices what training minimises."""

    box: float = 1.0
    focal: float = 0.0  # exponent of |p_student - p_teacher| weighting the class term
    # squared logit error where either model gives a class a score a detector would list
    # (>= CANDIDATE): detections are ranked by score, so low scores must be right as well;
    # KL alone barely moves scores of 0.05 against 0.1, which decide a ranking all the same
    logit: float = 0.1


CANDIDATE = 0.01


def discrepancy(
    teacher: Levels, student: Levels, weights: Weights = Weights()
) -> dict[str, torch.Tensor]:
    """{"class", "box"[, "logit"]}: per-batch means, each 0 when `student` equals `teacher`.

    The class term is the Bernoulli KL divergence of the student's class probabilities from
    the teacher's (BCE minus the teacher's entropy), optionally quality-focal weighted; the
    class and box terms are normalised by the teacher's total objectness, so frames with
    many objects do not drown frames with few.
    """
    t_cls, t_box = flatten_levels(teacher)
    s_cls, s_box = flatten_levels(student)
    t_prob = t_cls.float().sigmoid()
    s_cls, s_box, t_box = s_cls.float(), s_box.float(), t_box.float()
    objectness = t_prob.amax(dim=-1)  # (B, N): how sure the teacher is of any object
    norm = objectness.sum().clamp(min=1.0)
    entropy = F.binary_cross_entropy_with_logits(t_cls.float(), t_prob, reduction="none")
    kl_cls = F.binary_cross_entropy_with_logits(s_cls, t_prob, reduction="none") - entropy
    focal = (s_cls.sigmoid() - t_prob).abs().pow(weights.focal)
    bins = t_box.shape[-1] // 4
    t_dist = t_box.unflatten(-1, (4, bins)).log_softmax(-1)
    s_dist = s_box.unflatten(-1, (4, bins)).log_softmax(-1)
    kl_box = (t_dist.exp() * (t_dist - s_dist)).sum(-1).mean(-1)  # (B, N)
    terms = {
        "class": (kl_cls * focal).sum() / norm,
        "box": weights.box * (kl_box * objectness).sum() / norm,
    }
    if weights.logit:
        candidate = (torch.maximum(t_prob, s_cls.sigmoid()) >= CANDIDATE).float().detach()
        error = (s_cls - t_cls.float()).square() * candidate
        terms["logit"] = weights.logit * error.sum() / candidate.sum().clamp(min=1.0)
    return terms
