"""Knowledge distillation: the student's class distribution pulled towards a teacher's (Hinton et al. 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_target_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) of the temperature-softened class distributions, mean over rows, x T^2.

        p = softmax(teacher / T), q = softmax(student / T)
        loss = T^2 * mean_i sum_c p_ic (log p_ic - log q_ic)

    The T^2 factor keeps the gradient's scale independent of T (Hinton et al. 2015). Computed in
    float32 with autocast disabled. The teacher gets no gradient.

    Args:
        student_logits: (N, C) class scores of the model being trained.
        teacher_logits: (N, C) class scores of the teacher for the same rows.
        temperature: T > 0.

    Returns:
        Scalar float32 tensor, in nats, at least 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(f"student and teacher logits must both be (N, C); got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
        log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
        return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * temperature**2

